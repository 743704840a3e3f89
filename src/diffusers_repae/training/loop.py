"""The run around a training step: the Accelerator (setup, resume, trackers), data, checkpoint state, the step loop
and the end of a run.

The scripts stay linear (diffusers-examples style) and hand these functions plain values: the shared settings
travel as one frozen `RunConfig` (built by the CLI layer, ``diffusers_repae.training_args``, from the flags).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..errors import UserError
from ..run_lock import FolderLock, check_not_locked, release_folder
from .checkpointing import (
    LossHistory,
    PerProcessState,
    ProcessGenerators,
    RunSettings,
    all_finite,
    check_output_dir,
    checkpoint_step,
    load_checkpoint,
    register_checkpoint_state,
    remove_incomplete_checkpoints,
    remove_previous_run,
    resolve_resume_checkpoint,
    save_checkpoint,
    weights_finite,
)
from .data import TrainingData, build_dataloader, load_training_dataset
from .export import push_output_to_hub
from .optim import make_lr_schedulers
from .validation import plot_loss_curves

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """What every training run is told: output, batch, steps, schedule, precision, checkpoints, logging, Hub.

    The values of the scripts' shared flags (``add_run_args`` in ``diffusers_repae.training_args``, where each is
    explained); ``train_batch_size`` is per device (process) and micro-step, as in diffusers' examples.
    """

    output_dir: str | Path
    seed: int = 0
    train_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 400_000
    max_train_minutes: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str | None = None
    allow_tf32: bool = True
    dataloader_num_workers: int = 4
    checkpointing_steps: int = 50_000
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    overwrite: bool = False
    validation_steps: int = 10_000
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "diffusers-repae"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None

    def global_batch_size(self, num_processes: int) -> int:
        """Images per optimizer step: per-device batch x processes x accumulation steps."""
        return self.train_batch_size * num_processes * self.gradient_accumulation_steps


def configure_tf32(allow: bool) -> bool:
    """TF32 for matmuls and cuDNN convolutions on CUDA Ampere+ when ``allow`` (the original always enables it),
    strict fp32 otherwise; returns whether TF32 is on. Nothing to set without CUDA."""
    if not torch.cuda.is_available():
        return False
    enabled = allow and torch.cuda.get_device_capability()[0] >= 8
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists native bf16 instructions (else torch emulates bf16, which is slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The autocast dtype of the run's mixed precision (None for 'no'): the vision encoders run under it."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)


def setup_accelerator(run: RunConfig) -> Accelerator:
    """The Accelerator of a training run (seedable sampler for exact resume), logging, TF32, seed, output folder
    (checked, locked by the main process for the whole run: `diffusers_repae.run_lock`)."""
    output_dir = Path(run.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=None if run.report_to == "none" else run.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / run.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        # accelerate accepts it, but no fp16 autocast happens on the CPU: refuse rather than claim fp16
        raise UserError(
            "--mixed_precision fp16 needs a GPU; on the CPU use bf16 (fast where the CPU has bf16 units) or no."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state)
    source = "--mixed_precision" if run.mixed_precision is not None else "accelerate launch/config"
    logger.info(f"mixed precision: {accelerator.mixed_precision} (from {source}; the original trains in fp16)")
    tf32 = configure_tf32(run.allow_tf32)
    logger.info(f"TF32 matmuls/convolutions: {'on' if tf32 else 'off'}")
    set_seed(run.seed)  # identical on every process: same init and the same (sharded) data order
    if accelerator.is_main_process:  # a run in progress is reported as such, before anything else about the folder
        check_not_locked(output_dir)
    check_output_dir(output_dir, run.resume_from_checkpoint, run.overwrite, run.logging_dir)  # on every process
    resume = resolve_resume_checkpoint(run.resume_from_checkpoint, output_dir)
    if resume is not None and checkpoint_step(resume) > run.max_train_steps:
        raise UserError(
            f"--max_train_steps {run.max_train_steps} is below the step of the checkpoint to resume "
            f"({checkpoint_step(resume)}, {str(resume)!r}): pass --max_train_steps >= {checkpoint_step(resume)}."
        )
    if accelerator.is_main_process:
        FolderLock(output_dir).acquire()  # one run per folder; released by finish_run (or the OS, if it dies)
        previous = check_output_dir(output_dir, run.resume_from_checkpoint, run.overwrite, run.logging_dir)
        remove_previous_run(output_dir, previous)
        remove_incomplete_checkpoints(output_dir)  # the folder itself is made by the first write: a run refused
        # later (bad data, flags) leaves no empty --output_dir behind
    return accelerator


def resume_and_start_trackers(
    run: RunConfig, accelerator: Accelerator, tracker_config: dict | None = None
) -> tuple[int, Path | None]:
    """Loads ``--resume_from_checkpoint`` (all registered state) and starts the trackers (``tracker_config``: the
    run's flags, as the trackers record them).

    Returns ``(global_step, checkpoint)``; ``(0, None)`` for a new run.
    """
    global_step = 0
    resume = resolve_resume_checkpoint(run.resume_from_checkpoint, run.output_dir)
    if run.resume_from_checkpoint and resume is None:
        logger.info(f"no checkpoint found in {run.output_dir}; starting a new run")
    if resume is not None:
        logger.info(f"resuming from {resume}")
        load_checkpoint(accelerator, resume)  # safetensors/JSON and weights-only loads: runs no code
        global_step = checkpoint_step(resume)
    if accelerator.is_main_process and run.report_to != "none":
        accelerator.init_trackers(run.tracker_project_name, config=tracker_config or {})
    return global_step, resume


def load_data(
    accelerator: Accelerator,
    run: RunConfig,
    dataset_options: dict,
    wrap: Callable[[TrainingData], torch.utils.data.Dataset] | None = None,
) -> tuple[TrainingData, torch.utils.data.DataLoader]:
    """The run's training data (`load_training_dataset` with ``dataset_options``, this process's shard) and its
    DataLoader; ``wrap(data)``, where given, replaces the dataset (cached latents joined with their images, say).

    The main process renders/caches first, the others then read the cache.
    """
    with accelerator.main_process_first():
        data = load_training_dataset(
            **dataset_options, seed=run.seed, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )  # fmt: skip
        dataset = wrap(data) if wrap is not None else data.dataset
    data.dataset = dataset
    dataloader = build_dataloader(data, run.train_batch_size, run.dataloader_num_workers, seed=run.seed)
    return data, dataloader


def prepare_run_state(
    accelerator: Accelerator,
    run: RunConfig,
    data: TrainingData,
    dataloader: torch.utils.data.DataLoader,
    settings: RunSettings,
    **state,
) -> tuple[torch.utils.data.DataLoader, ProcessGenerators, LossHistory]:
    """Once the models and optimisers are prepared: the prepared DataLoader, the per-process generators and the
    loss history; ``settings``, ``state`` (objects with ``state_dict``, e.g. an EMA), the generators, the history
    and a stream's position are registered with every checkpoint (saved as safetensors + JSON, nothing pickled;
    the settings are checked on resume).

    A streamed dataset is already sharded per process (split_dataset_by_node): accelerate must not re-shard or
    dispatch it, so its DataLoader stays unprepared, batches move to the device in the loop, and its exact stream
    position is checkpointed per process.
    """
    if not data.streaming:
        dataloader = accelerator.prepare(dataloader)
    generators = ProcessGenerators(accelerator, run.seed)
    history = LossHistory()
    register_checkpoint_state(accelerator, run=settings, **state, generators=generators, history=history)
    if data.streaming:
        register_checkpoint_state(accelerator, stream=PerProcessState(accelerator, data.dataset))
    return dataloader, generators, history


def finish_run(accelerator: Accelerator, run: RunConfig, history: LossHistory, export: Callable[[Path], str]) -> Path:
    """The end of a run: on the main process ``export(output_dir)`` writes the model(s) and the model card and
    returns what to log, then the loss curves are plotted and ``--push_to_hub`` uploads the folder."""
    output_dir = Path(run.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        message = export(output_dir)
        if history.records:
            plot_loss_curves(history, output_dir / "loss_curves.png")
        logger.info(f"{message} (loss curves: {output_dir / 'loss_curves.png'})")
        if run.push_to_hub:
            push_output_to_hub(output_dir, run.hub_model_id, run.hub_token, run.logging_dir)
        release_folder(output_dir)
    accelerator.end_training()
    return output_dir


def run_training_loop(
    run: RunConfig,
    accelerator: Accelerator,
    data: TrainingData,
    dataloader,
    step_fn: Callable[[dict, int], dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    history: LossHistory,
    global_step: int,
    last_checkpoint: Path | None,
    validate: Callable[[int], None] | None = None,
    postfix_keys: tuple[str, ...] = ("sit/loss",),
    lr_factors: dict[str, Callable[[int], float]] | None = None,
) -> int:
    """Steps until ``--max_train_steps`` (or ``--max_train_minutes``), with exact-resume data order, logging,
    checkpoints and validation; returns the final step.

    ``step_fn(batch, global_step)`` runs one (micro-)step and returns its loss terms. A non-finite loss on any
    process stops every process with a message naming the last good checkpoint. Each optimiser's learning rate
    follows ``--lr_scheduler`` (one scheduler step per optimizer step), times ``lr_factors[name]`` where given.
    """
    output_dir = Path(run.output_dir)
    lr_schedulers = make_lr_schedulers(
        optimizers, run.lr_scheduler, run.lr_warmup_steps, run.max_train_steps, global_step, lr_factors
    )
    batches_done = global_step * run.gradient_accumulation_steps
    if data.streaming:  # a restored stream sits at its exact position, in its own epoch
        epoch, skip = data.dataset.epoch, 0
    else:
        epoch, skip = divmod(batches_done, len(dataloader))
    first_epoch = epoch
    progress = tqdm(
        range(run.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    step_start = train_start = time.perf_counter()
    out_of_time = False
    skipped_images = 0
    while global_step < run.max_train_steps and not out_of_time:
        if not data.streaming:
            dataloader.set_epoch(epoch)
        data.dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        skip = 0
        if data.streaming:
            logger.info(f"process {accelerator.process_index}: stream epoch {epoch} (window shuffle seed {run.seed})")
        batches_this_epoch = 0
        for batch in epoch_loader:
            batches_this_epoch += 1
            if data.streaming:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if isinstance(batch, dict) and "num_skipped" in batch:  # unreadable files replaced by a neighbour
                skipped_images += int(batch["num_skipped"].sum())
            logs = step_fn(batch, global_step)
            if not accelerator.sync_gradients:
                continue
            if not all_finite(accelerator, logs):
                bad = {k: float(v) for k, v in logs.items() if not math.isfinite(float(v))}
                raise RuntimeError(
                    f"non-finite loss at step {global_step + 1}: {bad}. Stopping; the last good checkpoint is "
                    f"{last_checkpoint or 'none (no checkpoint saved yet)'}. Try a lower learning rate, bf16 "
                    "instead of fp16, or resume from that checkpoint."
                )
            global_step += 1
            progress.update(1)
            elapsed = time.perf_counter() - step_start
            step_start = time.perf_counter()
            scalars = {k: accelerator.reduce(v.to(accelerator.device), "mean").item() for k, v in logs.items()}
            scalars.update({f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in optimizers.items()})
            with warnings.catch_warnings():  # an optimiser that has not stepped yet (the discriminator before
                # --disc_start, or the first step after a resume) would make torch warn; schedules count steps anyway
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                for lr_scheduler in lr_schedulers.values():  # after logging the rate this step used
                    lr_scheduler.step()
            images = run.global_batch_size(accelerator.num_processes)
            scalars["throughput/images_per_s"] = images / max(elapsed, 1e-9)
            skipped = torch.tensor(float(skipped_images), device=accelerator.device)
            scalars["data/skipped_images"] = accelerator.reduce(skipped, "sum").item()  # this run, all processes
            if accelerator.is_main_process:
                history.append(global_step, scalars)
            accelerator.log(scalars, step=global_step)
            progress.set_postfix({k.split("/")[0]: f"{scalars[k]:.4f}" for k in postfix_keys if k in scalars})

            if run.max_train_minutes is not None:  # every process must agree to stop at the same step
                late = torch.tensor([time.perf_counter() - train_start > 60 * run.max_train_minutes], dtype=torch.int)
                out_of_time = accelerator.reduce(late.to(accelerator.device), "max").item() > 0
                if out_of_time:
                    logger.info(f"--max_train_minutes {run.max_train_minutes} reached at step {global_step}")
            final_step = global_step == run.max_train_steps or out_of_time
            if global_step % run.checkpointing_steps == 0 or final_step:
                if not weights_finite(accelerator, optimizers.values()):  # never save a checkpoint that is broken
                    raise RuntimeError(
                        f"non-finite weights after step {global_step} (the losses were finite). Stopping; the last "
                        f"good checkpoint is {last_checkpoint or 'none (no checkpoint saved yet)'}. Try a lower "
                        "learning rate, bf16 instead of fp16, or resume from that checkpoint."
                    )
                last_checkpoint = save_checkpoint(accelerator, output_dir, global_step, run.checkpoints_total_limit)
                logger.info(f"saved {last_checkpoint}")
            if validate and run.validation_steps and global_step % run.validation_steps == 0:
                if accelerator.is_main_process:
                    validate(global_step)
            if final_step:
                break
        resumed_at_the_end = epoch == first_epoch and global_step > 0  # a stream checkpointed just before its end
        if batches_this_epoch == 0 and global_step < run.max_train_steps and not resumed_at_the_end:
            raise UserError(
                f"process {accelerator.process_index} read no full batch of {run.train_batch_size} in epoch {epoch}: "
                "the dataset (its shard, when streamed over several processes) is too small; lower "
                "--train_batch_size or use more images."
            )
        epoch += 1
    return global_step
