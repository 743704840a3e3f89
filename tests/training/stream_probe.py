"""Launched by test_streaming.py with ``accelerate launch`` on 2 CPU processes: which images each process reads in
two epochs of a streamed dataset, through the trainers' own loader (sharding, window shuffle, epochs)."""

import hashlib
import json
import sys

from accelerate import Accelerator
from accelerate.utils import gather_object

from diffusers_repae.training.data import build_dataloader, load_training_dataset

dataset_name, output = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
data = load_training_dataset(
    dataset_name=dataset_name,
    streaming=True,
    resolution=32,
    seed=0,
    process_index=accelerator.process_index,
    num_processes=accelerator.num_processes,
    shuffle_buffer_size=4,
)
dataloader = build_dataloader(data, batch_size=2)
seen = []
for epoch in range(2):
    data.dataset.set_epoch(epoch)
    for batch in dataloader:
        seen += [[epoch, hashlib.sha1(image.numpy().tobytes()).hexdigest()] for image in batch["pixel_values"]]
everyone = gather_object([seen])
if accelerator.is_main_process:
    with open(output, "w") as file:
        json.dump(everyone, file)
