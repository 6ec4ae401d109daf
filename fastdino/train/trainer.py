"""``train(config)``: the DINO run end to end, on one process or every rank of a torchrun job.

Data (``fastdino.data``) -> student and teacher (``networks``) -> the step (``step``) ->
metrics and progress (``progress``, ``collapse``) -> checkpoints and the exported backbone
(``checkpointing``). Each of those is its own module; this one wires them and keeps the
position: optimizer step ``step`` falls in epoch ``step // iterations_per_epoch``, and the
loader is always at micro-batch ``(step % iterations_per_epoch) * grad_accumulation_steps`` of
that epoch.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastdino.data import MultiCropRecipe, build_multicrop_loader, write_synthetic_image_folder
from fastdino.models import export_backbone_state_dict, read_checkpoint

from .checkpointing import (
    BACKBONE_EXPORT_NAME,
    LATEST_CHECKPOINT_NAME,
    atomic_torch_save,
    build_checkpoint,
    capture_rng_state,
    checkpoint_path,
    list_checkpoints,
    load_newest_checkpoint,
    point_latest_to,
    prune_checkpoints,
    remove_partial_files,
    restore_checkpoint,
    restore_rng_state,
)
from .collapse import CollapseMonitor
from .config import ConfigError, TrainConfig, save_config_json
from .distributed import DistributedContext, init_distributed, shutdown_distributed
from .networks import build_optimizer, build_student_and_teacher, compile_backbone
from .progress import ProgressReporter
from .schedules import build_schedules, global_batch_size
from .step import DINOStep, StepResult

METRICS_FILE_NAME = "metrics.jsonl"
CONFIG_FILE_NAME = "config.json"
SYNTHETIC_FOLDER_NAME = "synthetic_images"
_NOT_SEEN = torch.iinfo(torch.int64).max


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps done in total
    last_metrics: dict | None
    student: nn.Module
    teacher: nn.Module
    center: torch.Tensor


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training ``config`` describes; see the README for the command line."""
    config.validate()
    context = init_distributed(config.device)
    try:
        return Trainer(config, context).run()
    finally:
        shutdown_distributed(context)


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision='fp16': float16 with a gradient scaler needs a GPU; use bf16 or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def _peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _MetricsWindow:
    """What happened since the last log step, kept on the device until a log step reads it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_non_finite_step = torch.full((), _NOT_SEEN, dtype=torch.int64, device=device)
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0
        self.loss_sum = torch.zeros((), device=self.device)

    def record(self, result: StepResult, step: int) -> None:
        self.steps += 1
        self.loss_sum += result.loss
        # Remember the first step whose loss was not finite, without reading it on the host.
        first = self.first_non_finite_step
        newly_bad = ~torch.isfinite(result.loss) & (first == _NOT_SEEN)
        self.first_non_finite_step = torch.where(newly_bad, torch.full_like(first, step), first)


class Trainer:
    def __init__(self, config: TrainConfig, context: DistributedContext):
        self.config = config
        self.context = context
        self.device = context.device
        self.run_dir = config.run_dir
        self.autocast_dtype = _autocast_dtype(config, self.device)
        self.accumulation = config.grad_accumulation_steps
        self.last_good_checkpoint: Path | None = None
        self.last_collapse_mode: str | None = None

    # -- set-up ------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.context.is_main:
            print(f"fastdino.train: {text}", file=sys.stderr, flush=True)

    def _prepare_run_dir(self) -> None:
        existing = list_checkpoints(self.run_dir)
        if self.config.resume == "never" and existing:
            raise ConfigError(f"resume='never' but {self.run_dir} holds {len(existing)} checkpoint(s) "
                              f"(newest {existing[-1][1].name}): choose another --output-dir or "
                              f"--resume auto")
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_files(self.run_dir)
            save_config_json(self.config, self.run_dir / CONFIG_FILE_NAME)
        self.context.barrier()

    def _data_path(self) -> Path:
        if self.config.data:
            return Path(self.config.data)
        folder = self.run_dir / SYNTHETIC_FOLDER_NAME
        if self.context.is_main and not any(folder.glob("*/*.jpg")):
            self._say(f"no data given: writing {self.config.synthetic_images} synthetic images to {folder}")
            write_synthetic_image_folder(folder, n_images=self.config.synthetic_images, seed=self.config.seed)
        self.context.barrier()
        return folder

    def _build_loader(self):
        config = self.config
        recipe = MultiCropRecipe(global_crop_size=config.global_crop_size, local_crop_size=config.local_crop_size,
                                 global_crop_scale=config.global_crop_scale, local_crop_scale=config.local_crop_scale)
        loader = build_multicrop_loader(
            self._data_path(), config.batch_size_per_gpu, n_local_crops=config.n_local_crops,
            backend=config.data_backend, device=self.device, dtype=torch.float32,
            shard_id=self.context.rank, num_shards=self.context.world_size, seed=config.seed,
            num_threads=config.data_threads or None, recipe=recipe, verbose=self.context.is_main)
        iterations_per_epoch = len(loader) // self.accumulation
        if iterations_per_epoch == 0:
            raise ConfigError(f"grad_accumulation_steps={self.accumulation}: an epoch has only {len(loader)} "
                              f"batches of batch_size_per_gpu={config.batch_size_per_gpu} per rank")
        return loader, iterations_per_epoch

    def _build_networks(self) -> None:
        config = self.config
        # Identical initial weights on every rank; then a different random stream per rank
        # (drop path), as data-parallel training wants.
        torch.manual_seed(config.seed)
        self.student, self.teacher = build_student_and_teacher(config, self.device)
        if config.compile:
            compile_backbone(self.student)
            compile_backbone(self.teacher)
        self.optimizer = build_optimizer(config, self.student, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.center = torch.zeros(1, config.out_dim, device=self.device)
        self.trained_student = self.student
        if self.context.world_size > 1:
            self.trained_student = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        self.step_fn = DINOStep(
            self.trained_student, self.teacher, self.optimizer, self.center,
            student_temp=config.student_temp, center_momentum=config.center_momentum,
            clip_grad=config.clip_grad, autocast_dtype=self.autocast_dtype, scaler=self.scaler)
        torch.manual_seed(config.seed + self.context.rank)
        random.seed(config.seed + self.context.rank)

    # -- resume ------------------------------------------------------------------------------------

    def _checkpoint_to_resume(self) -> tuple[Path, dict] | None:
        resume = self.config.resume
        if resume == "never":
            return None
        if resume != "auto":
            return Path(resume), read_checkpoint(resume)
        # Rank 0 chooses (reading it proves it is intact), so that every rank resumes from the
        # same file, which must be on a file system all nodes share.
        found = load_newest_checkpoint(self.run_dir) if self.context.is_main else None
        chosen = [str(found[0]) if found else None]
        if self.context.initialized:
            dist.broadcast_object_list(chosen, src=0)
        if chosen[0] is None:
            return None
        if found is not None:
            return found
        path = Path(chosen[0])
        if not path.is_file():
            raise FileNotFoundError(f"rank {self.context.rank} cannot see {path}: output_dir must be on a "
                                    f"file system that every node shares")
        return path, read_checkpoint(path)

    def _resume(self, loader, iterations_per_epoch: int) -> int:
        """Restore the newest state; returns the optimizer steps already done."""
        found = self._checkpoint_to_resume()
        if found is None:
            return 0
        path, payload = found
        step = int(payload["step"])
        expected_position = {"epoch": step // iterations_per_epoch,
                             "step": (step % iterations_per_epoch) * self.accumulation}
        saved_position = {key: int(value) for key, value in payload["data"].items()}
        if saved_position != expected_position:
            raise ConfigError(
                f"{path} was written at optimizer step {step} with the loader at {saved_position}, but "
                f"this run has {iterations_per_epoch} steps per epoch (loader at {expected_position}): "
                f"batch_size_per_gpu, grad_accumulation_steps, the number of ranks or the data changed; "
                f"resume with the original settings or start a new output_dir")
        changed = sorted(key for key, value in payload["config"].items()
                         if key not in ("resume", "max_steps") and self.config.to_dict().get(key) != value)
        if changed:
            self._say(f"WARNING: resuming with changed config keys: {', '.join(changed)}")
        restore_checkpoint(payload, student=self.student, teacher=self.teacher, optimizer=self.optimizer,
                           scaler=self.scaler, center=self.center)
        loader.load_state_dict(payload["data"])
        rng_states = payload["rng"]
        if len(rng_states) == self.context.world_size:
            restore_rng_state(rng_states[self.context.rank], self.device)
        else:
            self._say(f"WARNING: {path} holds the RNG states of {len(rng_states)} ranks, this run has "
                      f"{self.context.world_size}: drop path draws will differ from the original run")
        self.last_good_checkpoint = path
        self._say(f"resumed from {path} at step {step} (epoch {payload['epoch']})")
        return step

    # -- checkpoints, export, metrics ----------------------------------------------------------

    def _raise_if_non_finite(self, window: _MetricsWindow) -> None:
        first = window.first_non_finite_step.clone()
        if self.context.initialized:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first_step = int(first)
        if first_step != _NOT_SEEN:
            kept = (f"the last good checkpoint is {self.last_good_checkpoint}" if self.last_good_checkpoint
                    else "no checkpoint was written before it")
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at optimizer step {first_step + 1} (epoch "
                f"{first_step // self.iterations_per_epoch}); training stopped and {kept}. Lower lr, "
                f"raise warmup_epochs, use clip_grad, or try precision=bf16 instead of fp16")

    def _save_checkpoint(self, step: int, window: _MetricsWindow, progress: ProgressReporter) -> None:
        self._raise_if_non_finite(window)  # never write a checkpoint of a diverged model
        rng_state = capture_rng_state(self.device)
        rng_states = [rng_state]
        if self.context.initialized:
            rng_states = [None] * self.context.world_size
            dist.all_gather_object(rng_states, rng_state)
        path = checkpoint_path(self.run_dir, step)
        if self.context.is_main:
            payload = build_checkpoint(
                student=self.student, teacher=self.teacher, optimizer=self.optimizer, scaler=self.scaler,
                center=self.center, epoch=step // self.iterations_per_epoch, step=step,
                config=self.config.to_dict(), data_state=self.loader.state_dict(), rng_states=rng_states)
            atomic_torch_save(payload, path)
            point_latest_to(path)
            prune_checkpoints(self.run_dir, self.config.keep_last_checkpoints)
            progress.message(f"checkpoint {path}")
        self.last_good_checkpoint = path

    def _export_backbone(self) -> Path:
        path = self.run_dir / BACKBONE_EXPORT_NAME
        if self.context.is_main:
            atomic_torch_save(export_backbone_state_dict(self.teacher), path)
        return path

    def _log(self, step: int, result: StepResult, window: _MetricsWindow, progress: ProgressReporter) -> dict:
        """Read the window's metrics (the one host sync of a log step) and report them."""
        self._raise_if_non_finite(window)
        values = self.schedules.at(step - 1)
        statistics = torch.stack([window.loss_sum / window.steps, result.teacher_entropy.float(),
                                  result.kl_divergence.float()])
        if self.context.initialized:
            dist.all_reduce(statistics)
            statistics /= self.context.world_size
        loss, entropy, kl_divergence = statistics.tolist()
        elapsed = time.perf_counter() - window.started
        metrics = {
            "step": step, "epoch": values.epoch, "loss": loss, "kl_divergence": kl_divergence,
            "teacher_entropy": entropy, "lr": values.learning_rate, "weight_decay": values.weight_decay,
            "teacher_momentum": values.teacher_momentum, "teacher_temperature": values.teacher_temperature,
            "images_per_second": window.steps * self.global_batch / elapsed,
            "data_wait_fraction": window.data_wait / elapsed,
            "peak_memory_gib": _peak_memory_gib(self.device),
        }
        sign = self.collapse_monitor.sign(entropy, step)
        mode = sign[0] if sign else None
        if sign:
            metrics["collapse_warning"] = sign[1]
            if mode != self.last_collapse_mode:  # say it when it starts, log it every time
                progress.message(f"WARNING at step {step}: {sign[1]}")
        self.last_collapse_mode = mode
        progress.log(metrics)
        window.reset()
        return metrics

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        self._prepare_run_dir()
        self.loader, self.iterations_per_epoch = self._build_loader()
        self._build_networks()
        step = self._resume(self.loader, self.iterations_per_epoch)
        self.schedules = build_schedules(config, self.iterations_per_epoch, self.context.world_size)
        self.global_batch = global_batch_size(config, self.context.world_size)
        self.collapse_monitor = CollapseMonitor(config.out_dim, grace_steps=self.iterations_per_epoch)
        total_steps = self.schedules.total_iterations
        stop_step = min(total_steps, config.max_steps) if config.max_steps else total_steps
        self._say(f"{config.preset}: {config.arch}, {self.context.world_size} rank(s) on {self.device}, "
                  f"global batch {self.global_batch}, {self.iterations_per_epoch} steps/epoch, "
                  f"steps {step} -> {stop_step} of {total_steps}, output {self.run_dir}")
        if step >= stop_step:
            self._say(f"nothing to do: the run in {self.run_dir} is at step {step} (stop at {stop_step})")
            return TrainResult(self.run_dir, step, None, self.student, self.teacher, self.center)

        progress = ProgressReporter(stop_step, step, self.run_dir / METRICS_FILE_NAME,
                                    enabled=self.context.is_main)
        window = _MetricsWindow(self.device)
        last_metrics = None
        self.student.train()
        self.teacher.train()  # as the release: batch statistics in a convnet teacher
        try:
            while step < stop_step:
                epoch = step // self.iterations_per_epoch
                micro_batches = []
                waited_from = time.perf_counter()
                for crops in self.loader:
                    window.data_wait += time.perf_counter() - waited_from
                    micro_batches.append(crops)
                    if len(micro_batches) < self.accumulation:
                        waited_from = time.perf_counter()
                        continue
                    log_now = (step + 1) % config.log_every_steps == 0 or step + 1 == stop_step
                    result = self.step_fn(micro_batches, self.schedules.at(step),
                                          freeze_last_layer=epoch < config.freeze_last_layer, measure=log_now)
                    micro_batches = []
                    window.record(result, step)
                    step += 1
                    progress.advance(step, epoch)
                    if log_now:
                        last_metrics = self._log(step, result, window, progress)
                    if step == stop_step or step % self.iterations_per_epoch == 0:
                        break
                    if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                        self._save_checkpoint(step, window, progress)
                    waited_from = time.perf_counter()
                epoch_finished = step % self.iterations_per_epoch == 0
                if epoch_finished:
                    self.loader.set_epoch(step // self.iterations_per_epoch)
                self._save_checkpoint(step, window, progress)
                if epoch_finished:
                    self._export_backbone()
        finally:
            progress.close()
        if step % self.iterations_per_epoch:  # stopped mid-epoch (max_steps): export the teacher too
            self._export_backbone()
        export = self.run_dir / BACKBONE_EXPORT_NAME
        if self.context.is_main:
            self._say(f"done: {step} steps. Checkpoint {self.run_dir / LATEST_CHECKPOINT_NAME}, "
                      f"teacher backbone {export}, metrics {self.run_dir / METRICS_FILE_NAME}, "
                      f"config {self.run_dir / CONFIG_FILE_NAME}")
        return TrainResult(self.run_dir, step, last_metrics, self.student, self.teacher, self.center)
