"""Training data: one loader for the Hub (ImageNet, streaming or not), local image folders and embedded OpenMoji.

Every sample is ``{"pixel_values": uint8 [3, R, R], "labels": int64, "num_skipped": int64}``: the VAE and the
vision encoders each do their own scaling from uint8 (SPEC sections 4 and 5).

Bad files never stop an epoch. Images are decoded here (the ``datasets`` image column is cast to
``decode=False``), so a truncated or unreadable file is caught, counted and replaced:

* map-style datasets return the next readable index instead, so batches keep their size (BatchNorm and DDP want
  equal batches); ``num_skipped`` is 1 when the sample's own file was bad and replaced, so summing it over an
  epoch counts every bad file once;
* streaming datasets simply drop the bad sample; the next good sample carries the count.

Sum ``batch["num_skipped"]`` in the training loop to log the count (this works with DataLoader workers, unlike
the in-process `SkipCounter`, which only sees the main process when ``num_workers=0``).

Deterministic order and exact resume (map-style). The training script must:

1. create ``Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))`` and call
   ``accelerate.utils.set_seed(seed)`` before `build_dataloader`;
2. at the start of every epoch call ``dataloader.set_epoch(epoch)`` *and* ``data.dataset.set_epoch(epoch)`` (the
   latter drives the per-sample flip, which is a pure function of ``(seed, epoch, index)``);
3. on resume at ``global_step`` (optimizer steps x gradient accumulation = batches), start at
   ``epoch = batches_done // len(dataloader)`` and iterate
   ``accelerator.skip_first_batches(dataloader, batches_done % len(dataloader))`` for that first epoch.

Streaming datasets are sharded per process with ``datasets.distributed.split_dataset_by_node`` (disjoint) and
shuffled in seeded windows (`StreamingImageLabelDataset`); a new epoch starts when a process's stream ends. For
exact resume, save ``data.dataset.state_dict()`` per process in the checkpoint and restore it with
``load_state_dict`` before the first epoch, whose number then comes from ``data.dataset.epoch``. The position is
the main process's, so stream with ``num_workers=0`` (workers would read ahead of it).

Scripts that read a dataset once (latent caches, statistics, reference sets) want the source order:
``load_training_dataset(..., shuffle=False)`` gives a stream in that order (shuffle windows of one row), and
`StreamingImageLabelDataset.read_in_order` yields rows with their stream index, decoding only the rows asked for.
In a batch, `real_images` tells stand-ins (map-style) from real images and counts the bad files either way.
"""

from __future__ import annotations

import copy
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .images import BadImageError, SkipCounter, adm_center_crop, decode_image, image_to_tensor

# Hub ImageNet at the two resolutions the paper uses; own data may use any multiple of 16.
IMAGENET_RESOLUTIONS = (256, 512)
DEFAULT_SHUFFLE_BUFFER = 10_000
DEFAULT_LABEL_COLUMN = "label"  # the one label column that may be missing (then: one class)


def _flip_decision(seed: int, epoch: int, index: int) -> bool:
    """A coin flip that depends only on (seed, epoch, index): exact resume gives the same flips."""
    return random.Random(hash((seed, epoch, index))).random() < 0.5


def _process(image: Image.Image, resolution: int, flip: bool) -> torch.Tensor:
    image = adm_center_crop(image, resolution)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image_to_tensor(image)


class ImageLabelDataset(torch.utils.data.Dataset):
    """Map-style wrapper over a ``datasets.Dataset``: decodes, converts, crops, flips, and steps over bad files."""

    def __init__(
        self,
        hf_dataset,
        image_column: str = "image",
        label_column: str | None = "label",
        resolution: int = 256,
        random_flip: bool = False,
        seed: int = 0,
        min_side: int = 8,
        max_consecutive_bad: int = 100,
    ) -> None:
        from datasets import Image as ImageFeature

        if image_column not in hf_dataset.column_names:
            raise ValueError(f"image_column {image_column!r} not in the dataset columns {hf_dataset.column_names}.")
        self.dataset = hf_dataset.cast_column(image_column, ImageFeature(decode=False))
        self.image_column, self.label_column = image_column, label_column
        self.resolution, self.random_flip, self.seed = resolution, random_flip, seed
        self.min_side, self.max_consecutive_bad = min_side, max_consecutive_bad
        self.epoch = 0
        self.counter = SkipCounter()

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Changes the flip pattern per epoch (call it from the training loop, see the module docstring)."""
        self.epoch = epoch

    def from_start(self) -> ImageLabelDataset:
        """The dataset as epoch 0 sees it, for reading outside training (validation images, statistics)."""
        view = copy.copy(self)
        view.epoch = 0
        return view

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(min(self.max_consecutive_bad, len(self.dataset))):
            position = (index + offset) % len(self.dataset)
            row = self.dataset[position]
            try:
                image = decode_image(row[self.image_column], self.min_side, self.counter if offset == 0 else None)
            except BadImageError as error:
                if offset == 0:  # count each bad file once per epoch: only when its own index asks for it
                    self.counter.skip(error.reason)
                continue
            flip = self.random_flip and _flip_decision(self.seed, self.epoch, index)
            label = int(row[self.label_column]) if self.label_column else 0
            return {
                "pixel_values": _process(image, self.resolution, flip),
                "labels": torch.tensor(label, dtype=torch.int64),
                "num_skipped": torch.tensor(int(offset > 0), dtype=torch.int64),
            }
        tried = min(self.max_consecutive_bad, len(self.dataset))
        whole = tried == len(self.dataset)
        raise BadImageError(
            "unreadable dataset",
            (f"none of its {tried} images could be read" if whole else f"{tried} consecutive unreadable images from "
             f"index {index}") + f": the dataset looks broken ({self.counter.summary()}).",
        )  # fmt: skip


_STREAM_START = {"source": None, "window": 0, "used": 0}  # a stream position: see StreamingImageLabelDataset


class StreamingImageLabelDataset(torch.utils.data.IterableDataset):
    """Iterable wrapper over a (sharded) ``datasets.IterableDataset``: shuffles, decodes, drops bad files and counts
    them, and knows its exact position for checkpoints.

    The stream is shuffled in consecutive windows of ``window_size`` rows, each with its own permutation drawn from
    ``(seed, epoch, window)``. A position is then ``(the source's state at the window's start, rows of the window
    used)``, so a resumed run re-reads at most one window and continues with exactly the rows an uninterrupted run
    would have seen. (``datasets``' own buffer shuffle cannot do this: its buffer is dropped on resume.)
    """

    def __init__(
        self,
        hf_dataset,
        image_column: str = "image",
        label_column: str | None = "label",
        resolution: int = 256,
        random_flip: bool = False,
        seed: int = 0,
        min_side: int = 8,
        window_size: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        from datasets import Image as ImageFeature

        if window_size < 1:
            raise ValueError(f"shuffle_buffer_size must be >= 1, got {window_size!r}.")
        self.dataset = hf_dataset.cast_column(image_column, ImageFeature(decode=False))
        self.image_column, self.label_column = image_column, label_column
        self.resolution, self.random_flip, self.seed, self.min_side = resolution, random_flip, seed, min_side
        self.window_size = window_size
        self.epoch = 0
        self._position = _STREAM_START
        self.counter = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Starts epoch ``epoch`` at the beginning of the stream (a new permutation per window); the current epoch
        keeps its position, so calling this right after a resume changes nothing."""
        if epoch != self.epoch:
            self._position = _STREAM_START
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def from_start(self) -> StreamingImageLabelDataset:
        """An independent stream from the start of epoch 0, for reading outside training (validation images,
        statistics) without moving the training position."""
        view = copy.copy(self)
        view.dataset = self._epoch_zero_copy()
        view.epoch, view._position = 0, _STREAM_START
        return view

    def state_dict(self) -> dict:
        """The exact stream position (JSON-serialisable) for checkpoints."""
        return {"epoch": self.epoch, **self._position}

    def load_state_dict(self, state: dict) -> None:
        if "examples_iterable" in state:  # saved before windows existed: only the source's position is known
            state = {"epoch": state.get("epoch", 0), "source": state, "window": 0, "used": 0}
        self.epoch = int(state["epoch"])
        self.dataset.set_epoch(self.epoch)
        self._position = {"source": state["source"], "window": int(state["window"]), "used": int(state["used"])}

    def _window_order(self, window: int, length: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, window]).permutation(length)

    def _epoch_zero_copy(self):
        """A copy of the source stream at the start of epoch 0 (no shard reshuffle): reading it leaves the training
        position where it is."""
        source = copy.deepcopy(self.dataset)
        source.set_epoch(0)
        return source

    def _source_rows(self) -> Iterator[dict]:
        """The raw rows (images still encoded) in source order, from the start of epoch 0, on a copy."""
        return iter(self._epoch_zero_copy())

    def count_rows(self, stop: int | None = None) -> int:
        """Rows in the stream (at most ``stop``), counted by reading it without decoding any image."""
        return sum(1 for _ in itertools.islice(self._source_rows(), stop))

    def read_in_order(
        self, keep: Callable[[int], bool] | None = None, stop: int | None = None, num_threads: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The rows ``index < stop`` with ``keep(index)`` true, in source order, each with its stream ``index``
        (the position in this process's part of the stream; load with one process to number the whole stream).

        Rows not kept are read but not decoded (cheap next to decoding). A bad file is yielded too, with
        ``num_skipped`` 1 and zero pixels, so the caller can count it and knows where it stands. No flip, no
        shuffle window. ``num_threads`` > 0 decodes that many rows at a time in threads (PIL releases the GIL
        while decoding and resizing), still yielding in order.
        """

        def sample(item: tuple[int, dict]) -> dict[str, torch.Tensor]:
            index, row = item
            label = int(row[self.label_column]) if self.label_column else 0
            try:
                image = decode_image(row[self.image_column], self.min_side, self.counter)
                pixels, bad = _process(image, self.resolution, False), 0
            except BadImageError as error:
                self.counter.skip(error.reason)
                pixels, bad = torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8), 1
            return {
                "pixel_values": pixels,
                "labels": torch.tensor(label, dtype=torch.int64),
                "num_skipped": torch.tensor(bad, dtype=torch.int64),
                "index": torch.tensor(index, dtype=torch.int64),
            }

        rows = itertools.islice(enumerate(self._source_rows()), stop)
        wanted = rows if keep is None else (item for item in rows if keep(item[0]))
        if num_threads <= 0:
            yield from map(sample, wanted)
            return
        with ThreadPoolExecutor(num_threads) as pool:  # a bounded read-ahead keeps memory flat
            pending: deque = deque()
            for item in wanted:
                pending.append(pool.submit(sample, item))
                if len(pending) >= 2 * num_threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = self._position
        if start["source"] is not None:
            self.dataset.load_state_dict(start["source"])
        rows = iter(self.dataset)
        window_source, window, used = start["source"], start["window"], start["used"]
        pending_bad = 0
        while rows_of_window := list(itertools.islice(rows, self.window_size)):
            next_source = self.dataset.state_dict()  # taken before anything of this window is yielded
            order = self._window_order(window, len(rows_of_window))
            for slot in range(used, len(rows_of_window)):
                self._position = {"source": window_source, "window": window, "used": slot + 1}
                row = rows_of_window[order[slot]]
                try:
                    image = decode_image(row[self.image_column], self.min_side, self.counter)
                except BadImageError as error:
                    self.counter.skip(error.reason)
                    pending_bad += 1
                    continue
                index = window * self.window_size + slot  # the row's place in this epoch's shuffled stream
                flip = self.random_flip and _flip_decision(self.seed, self.epoch, index)
                label = int(row[self.label_column]) if self.label_column else 0
                yield {
                    "pixel_values": _process(image, self.resolution, flip),
                    "labels": torch.tensor(label, dtype=torch.int64),
                    "num_skipped": torch.tensor(pending_bad, dtype=torch.int64),
                }
                pending_bad = 0
            window_source, window, used = next_source, window + 1, 0
        self._position = _STREAM_START  # the stream is used up; the next epoch starts from its beginning


@dataclass
class TrainingData:
    """What `load_training_dataset` returns: the torch dataset plus what the models and model cards need."""

    dataset: ImageLabelDataset | StreamingImageLabelDataset
    num_classes: int
    id2label: dict[int, str]
    source: str
    streaming: bool = False
    attribution: str | None = None  # licence text to carry into READMEs / model cards (OpenMoji)
    extra: dict = field(default_factory=dict)
    num_examples: int | None = None  # images in the split (all processes); None: a stream of unknown length

    def describe_size(self) -> str:
        """For logs: '1,281,167 images' or, for a stream without split sizes in its metadata, 'unknown'."""
        if self.num_examples is None:
            return "an unknown number of images (streamed; the dataset's metadata gives no split size)"
        return f"{self.num_examples:,} images" + (" (streamed)" if self.streaming else "")

    def num_to_read(self, limit: int | None = None) -> int | None:
        """Images a script reading at most ``limit`` of them gets (for progress bars): the smaller of ``limit`` and
        the size when the size is known; ``limit`` (an upper bound) or None for a stream of unknown size."""
        if self.num_examples is None:
            return limit
        return self.num_examples if limit is None else min(limit, self.num_examples)

    @property
    def counter(self) -> SkipCounter:
        return self.dataset.counter


def check_resolution(resolution: int, imagenet: bool = False) -> None:
    """ImageNet: 256 or 512 (the paper's settings). Own data: any positive multiple of 16."""
    if imagenet and resolution not in IMAGENET_RESOLUTIONS:
        raise ValueError(f"resolution must be one of {IMAGENET_RESOLUTIONS} for ImageNet, got {resolution!r}.")
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, got {resolution!r}.")


def _check_columns(features, image_column: str, label_column: str | None, source: str) -> None:
    """A column the dataset does not have is refused, naming it and the columns there are. Only the default label
    column may be missing (an image folder without class subfolders: one class); a mistyped one would silently
    train a single class."""
    if features is None:  # a stream that does not announce its columns: a wrong name fails at the first row
        return
    columns = sorted(features)
    if image_column not in features:
        raise UserError(
            f"--image_column {image_column!r} is not a column of {source}; its columns are {columns}: pass one."
        )
    if label_column is not None and label_column != DEFAULT_LABEL_COLUMN and label_column not in features:
        raise UserError(
            f"--label_column {label_column!r} is not a column of {source}; its columns are {columns}: pass one of "
            f"them (or leave the flag out: without a {DEFAULT_LABEL_COLUMN!r} column every image is one class)."
        )


def _label_info(features, label_column: str | None) -> tuple[int, dict[int, str]]:
    """Class count and names from a ClassLabel column; a missing column means one class."""
    if label_column is None or features is None or label_column not in features:
        return 1, {0: "all"}
    feature = features[label_column]
    names = getattr(feature, "names", None)
    if names is None:
        raise ValueError(
            f"label_column {label_column!r} is not a datasets.ClassLabel column ({feature}); cast it with "
            "dataset.class_encode_column first."
        )
    return len(names), dict(enumerate(names))


def load_training_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | Path | None = None,
    dataset_config_name: str | None = None,
    streaming: bool = False,
    image_column: str = "image",
    label_column: str | None = "label",
    resolution: int = 256,
    random_flip: bool = False,
    split: str = "train",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    embedded_label_by: str = "group",
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    min_side: int = 8,
    embedded_limit: int | None = None,
    shuffle: bool = True,
) -> TrainingData:
    """The one loader all scripts use.

    ``dataset_name``: a Hub dataset (e.g. ``ILSVRC/imagenet-1k``; ``streaming=True`` for ImageNet-scale data,
    then sharded over ``num_processes`` and buffer-shuffled with ``seed``). ``train_data_dir``: a local image
    folder (``class_name/xxx.png``), read with ``load_dataset("imagefolder")``. Neither: the embedded OpenMoji
    emoji, rendered at ``resolution`` once and cached (labels: Unicode ``group`` or ``subgroup``).

    ``shuffle=False``: a stream yields its rows in source order (shuffle windows of one row) - for scripts that read
    a dataset once. Map-style datasets are never shuffled here (`build_dataloader` does that).
    """
    from datasets import load_dataset

    if dataset_name and train_data_dir:
        raise ValueError("give dataset_name or train_data_dir, not both.")
    check_resolution(resolution, imagenet=bool(dataset_name) and "imagenet" in dataset_name.lower())
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, num_processes={num_processes}), got {process_index!r}.")
    cache_dir = str(cache_dir) if cache_dir is not None else None
    attribution, extra = None, {}
    if dataset_name:
        source = f"hub:{dataset_name}"
        hf_dataset = load_dataset(
            dataset_name, dataset_config_name, split=split, cache_dir=cache_dir, streaming=streaming
        )
    elif train_data_dir:
        if not Path(train_data_dir).is_dir():
            raise ValueError(f"train_data_dir {str(train_data_dir)!r} is not a directory.")
        source = f"imagefolder:{train_data_dir}"
        hf_dataset = load_dataset(
            "imagefolder", data_dir=str(train_data_dir), split=split, cache_dir=cache_dir, streaming=streaming
        )
    else:
        from .openmoji import OPENMOJI_ATTRIBUTION, load_openmoji_dataset

        if embedded_label_by not in ("group", "subgroup"):
            raise ValueError(f"embedded_label_by must be 'group' or 'subgroup', got {embedded_label_by!r}.")
        source = f"openmoji:{embedded_label_by}"
        hf_dataset = load_openmoji_dataset(resolution=resolution, cache_dir=cache_dir, limit=embedded_limit)
        if streaming:
            hf_dataset = hf_dataset.to_iterable_dataset(num_shards=max(num_processes, 1))
        label_column, attribution = embedded_label_by, OPENMOJI_ATTRIBUTION
    _check_columns(hf_dataset.features, image_column, label_column, source)
    num_classes, id2label = _label_info(hf_dataset.features, label_column)
    if label_column is not None and hf_dataset.features is not None and label_column not in hf_dataset.features:
        label_column = None  # e.g. an image folder without class subfolders: one class
    if streaming:
        from datasets.distributed import split_dataset_by_node

        num_examples = _split_size(hf_dataset, split)
        if num_processes > 1:  # disjoint: whole shards per process when they divide evenly, else every n-th row
            hf_dataset = split_dataset_by_node(hf_dataset, rank=process_index, world_size=num_processes)
        window = shuffle_buffer_size if shuffle else 1
        dataset = StreamingImageLabelDataset(
            hf_dataset, image_column, label_column, resolution, random_flip, seed, min_side, window
        )
    else:
        dataset = ImageLabelDataset(hf_dataset, image_column, label_column, resolution, random_flip, seed, min_side)
        num_examples = len(dataset)
    return TrainingData(dataset, num_classes, id2label, source, streaming, attribution, extra, num_examples)


def _split_size(hf_dataset, split: str) -> int | None:
    """The split's size from the dataset's metadata (known for the Hub's ImageNet), else None."""
    splits = getattr(hf_dataset.info, "splits", None) or {}
    size = getattr(splits.get(split), "num_examples", None)
    return size or None


def real_images(batch: dict[str, torch.Tensor], streaming: bool) -> tuple[torch.Tensor, int]:
    """Which samples of a batch are real images, and how many bad files the batch accounts for.

    Map-style: a sample with ``num_skipped`` 1 is a neighbour standing in for a bad file (leave it out). Stream:
    bad files were dropped, every sample is real and ``num_skipped`` counts the bad files before it.
    """
    skipped = batch["num_skipped"]
    if streaming:
        return torch.ones_like(skipped, dtype=torch.bool), int(skipped.sum())
    good = skipped == 0
    return good, int((~good).sum())


def build_dataloader(
    data: TrainingData, batch_size: int, num_workers: int = 0, seed: int = 0, drop_last: bool = True
) -> torch.utils.data.DataLoader:
    """A DataLoader with a seeded shuffle (map-style) for ``accelerator.prepare``; see the module docstring."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    if drop_last and not data.streaming and len(data.dataset) < batch_size:
        raise ValueError(
            f"the dataset has {len(data.dataset)} images, fewer than one batch of {batch_size} per process: lower "
            "--train_batch_size (or use more images)."
        )
    generator = torch.Generator().manual_seed(seed)
    shuffle = not data.streaming
    return torch.utils.data.DataLoader(
        data.dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
