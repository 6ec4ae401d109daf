"""``train(config)``: the DINO run end to end, on one process or every rank of a torchrun job.

``Trainer.__init__`` builds the whole run before it starts, in the order data flows: the output
directory, the loader (``fastdino.data``), student, teacher and optimizer (``networks``), the
step (``step``), the schedules, and the state of the checkpoint it resumes from
(``checkpointing``). ``Trainer.run`` is then one loop over the loader's (step, micro-batches):
the step, its metrics (``progress``, ``collapse``), checkpoints and the exported backbone.

The loader alone holds the data position (``MultiCropLoader.state_dict``); the optimizer steps
done are derived from it (``MultiCropLoader.steps_done``), and step ``s`` falls in epoch
``s // steps_per_epoch``.
"""

from __future__ import annotations

import json
import random
import resource
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastdino.data import (IBOTMaskRecipe, IBOTMasks, ImageFolderError, build_multicrop_loader, sample_ibot_masks,
                           write_synthetic_image_folder)
from fastdino.models import attention_kernels_report, export_backbone_state_dict
from fastdino.runtime import (CollectiveTimeoutError, Runtime, atomic_save, get_logger, is_collective_timeout,
                              runtime_scope, unresponsive_ranks)

from .checkpointing import (
    BACKBONE_EXPORT_NAME,
    LATEST_CHECKPOINT_NAME,
    build_checkpoint,
    capture_rng_state,
    checkpoint_kind,
    checkpoint_path,
    checkpoint_to_resume,
    loss_state,
    point_latest_to,
    prune_checkpoints,
    remove_partial_files,
    restore_checkpoint,
    restore_loss_state,
    restore_rng_state,
    resumable_files,
)
from .collapse import CollapseMonitor
from .config import ConfigError, TrainConfig, apply_environment, resolve_backends, save_config_json
from .networks import build_optimizer, build_student_and_teacher, compile_backbone
from .preemption import STOPPED_MARKER_NAME, StopSignals
from .sharding import (export_full_backbone_state_dict, load_sharded_checkpoint, save_sharded_checkpoint,
                       shard_student_and_teacher)
from .progress import METRICS_FILE_NAME, TrainingProgress
from .schedules import build_schedules, global_batch_size
from .dinov2_step import DINOv2Step
from .step import DINOStep, StepResult

CONFIG_FILE_NAME = "config.json"
SYNTHETIC_FOLDER_NAME = "synthetic_images"
_NOT_SEEN = torch.iinfo(torch.int64).max
logger = get_logger("train")


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
    stopped_by: str | None = None  # the signal that stopped the run early (checkpoint written)
    patch_center: torch.Tensor | None = None  # method=dinov2: the iBOT head's center


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training ``config`` describes; see the README for the command line."""
    config = apply_environment(config.validate())
    with runtime_scope(config.device, config.distributed_timeout_minutes) as runtime:
        return Trainer(config, runtime).run()


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
    """A DINO run, fully built by the constructor; ``run()`` trains it to ``stop_step``."""

    def __init__(self, config: TrainConfig, runtime: Runtime):
        self.config = config
        self.runtime = runtime
        self.device = runtime.device
        self.run_dir = config.run_dir
        self.backends = resolve_backends(config, self.device)
        self._prepare_run_dir()

        self.loader = self._build_loader()
        self.steps_per_epoch = self.loader.steps_per_epoch

        # Identical initial weights on every rank; then a different random stream per rank
        # (drop path), as data-parallel training wants.
        torch.manual_seed(config.seed)
        self.student, self.teacher = build_student_and_teacher(config, self.device)
        self.sharded = config.parallelism == "fsdp" and runtime.world_size > 1
        if config.parallelism == "fsdp" and not self.sharded:
            logger.warning("parallelism=fsdp with one process: nothing to shard, training unsharded")
        if self.sharded:  # before the optimizer: sharding replaces the parameters
            shard_student_and_teacher(self.student, self.teacher, mixed_precision_dtype=config.autocast_dtype)
        if config.compile:
            compile_backbone(self.student)
            compile_backbone(self.teacher)
        self.optimizer = build_optimizer(config, self.student, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if config.resolved_precision == "fp16" else None
        self.center = torch.zeros(1, config.out_dim, device=self.device)
        self.patch_center = None
        if config.method == "dinov2":
            patch_dim = config.ibot_out_dim if config.ibot_separate_head else config.out_dim
            self.patch_center = torch.zeros(1, patch_dim, device=self.device)
        self.mask_recipe = self._mask_recipe()
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="fastdino-masks")
        self._next_masks: tuple | None = None  # (step, future of its host masks)
        trained_student = self.student
        if runtime.world_size > 1 and not self.sharded:
            trained_student = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        step_options = dict(student_temp=config.student_temp, center_momentum=config.center_momentum,
                            clip_grad=config.clip_grad, autocast_dtype=config.autocast_dtype, scaler=self.scaler,
                            ops_backend=config.ops_backend)
        if config.method == "dinov2":
            self.step_fn = DINOv2Step(
                trained_student, self.teacher, self.optimizer, self.center, patch_center=self.patch_center,
                centering=config.centering, dino_loss_weight=config.dino_loss_weight,
                ibot_loss_weight=config.ibot_loss_weight, koleo_loss_weight=config.koleo_loss_weight,
                **step_options)
        else:
            self.step_fn = DINOStep(trained_student, self.teacher, self.optimizer, self.center, **step_options)
        torch.manual_seed(config.seed + runtime.rank)
        random.seed(config.seed + runtime.rank)

        self.schedules = build_schedules(config, self.steps_per_epoch, runtime.world_size)
        self.global_batch = global_batch_size(config, runtime.world_size)
        total_steps = self.schedules.total_iterations
        self.stop_step = min(total_steps, config.max_steps) if config.max_steps else total_steps
        self.collapse_monitor = CollapseMonitor(config.out_dim, grace_steps=self.steps_per_epoch)
        self.patch_collapse_monitor = (CollapseMonitor(self.patch_center.shape[1], grace_steps=self.steps_per_epoch)
                                       if self.patch_center is not None else None)
        self.last_collapse_mode: dict[str, str | None] = {}
        self.last_good_checkpoint = self._resume()
        self.start_step = self.loader.steps_done
        self.stop_signals = StopSignals(runtime)
        self.waiting_in = "the start"  # what the ranks do together now, for a timeout's message
        logger.info(f"{config.preset}: {config.arch}, {runtime.world_size} rank(s) on {self.device}, "
                    f"global batch {self.global_batch}, {self.steps_per_epoch} steps/epoch, steps "
                    f"{self.start_step} -> {self.stop_step} of {total_steps}, output {self.run_dir}; "
                    + ", ".join(f"{key} {value}" for key, value in self.backends.items()))
        if config.is_vit:
            self._log_attention_kernels()

    # -- set-up ------------------------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        existing = resumable_files(self.run_dir)
        if self.config.resume == "never" and existing:
            raise ConfigError(f"resume='never' but {self.run_dir} holds {len(existing)} checkpoint(s) "
                              f"(newest {existing[0].name}): choose another --output-dir, --resume auto, "
                              f"or --resume restart to start over with them moved aside")
        if self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_files(self.run_dir)
            (self.run_dir / STOPPED_MARKER_NAME).unlink(missing_ok=True)
            save_config_json(self.config, self.backends, self.run_dir / CONFIG_FILE_NAME)
        self.runtime.barrier()

    def _log_attention_kernels(self) -> None:
        dtype = self.config.autocast_dtype or torch.float32
        running = self.backends["attention"]
        how = "all crops packed in one forward" if running == "xformers" else "one forward per crop resolution"
        logger.info(f"attention on {self.device} in {str(dtype).removeprefix('torch.')}: "
                    f"{attention_kernels_report(self.device, dtype)}; running {running} ({how})")

    def _data_path(self) -> Path:
        if self.config.data:
            return Path(self.config.data)
        folder = self.run_dir / SYNTHETIC_FOLDER_NAME
        if self.runtime.is_main and not any(folder.glob("*/*.jpg")):
            logger.info(f"no data given: writing {self.config.synthetic_images} synthetic images to {folder}")
            write_synthetic_image_folder(folder, n_images=self.config.synthetic_images, seed=self.config.seed)
        self.runtime.barrier()
        return folder

    def _build_loader(self):
        config, runtime = self.config, self.runtime
        data_path = self._data_path()
        try:
            return build_multicrop_loader(
                data_path, config.batch_size_per_gpu, n_local_crops=config.n_local_crops,
                backend=config.data_backend, device=self.device, dtype=torch.float32,
                shard_id=runtime.rank, num_shards=runtime.world_size, seed=config.seed,
                num_threads=config.data_threads or None, recipe=config.multicrop_recipe(),
                skip_bad_files=config.skip_bad_files, cache_dir=config.data_cache_dir or None,
                runtime=runtime,
                batches_per_step=config.grad_accumulation_steps, verbose=runtime.is_main)
        except ImageFolderError:
            raise
        except ValueError as error:  # the data is too small for the batch (and accumulation) asked for
            raise ConfigError(f"batch_size_per_gpu={config.batch_size_per_gpu}, grad_accumulation_steps="
                              f"{config.grad_accumulation_steps} on {runtime.world_size} rank(s) do not fit "
                              f"{data_path}: {error}") from None

    def _mask_recipe(self) -> IBOTMaskRecipe | None:
        """DINOv2's masks of the global crops, when the student is masked; else None."""
        if not self.config.uses_masks:
            return None
        return IBOTMaskRecipe(grid_size=self.config.global_crop_size // self.config.patch_size,
                              mask_sample_probability=self.config.mask_sample_probability,
                              mask_ratio_min_max=self.config.mask_ratio_min_max)

    def _draw_masks(self, step: int, n_micro: int) -> list[IBOTMasks]:
        """The host masks of optimizer step ``step``'s micro-batches, from the same (seed, epoch,
        shard, batch) as the loader's crops: a resumed run gets the same masks."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return [sample_ibot_masks(self.mask_recipe, self.config.batch_size_per_gpu, self.config.seed, epoch,
                                  self.runtime.rank, step_in_epoch * n_micro + index) for index in range(n_micro)]

    def _masks(self, step: int, n_micro: int) -> list[IBOTMasks] | None:
        """Step ``step``'s masks on the device. The next step's are drawn meanwhile in a thread of
        their own (1.4 ms of Python per batch of 64, off the training thread's critical path)."""
        if self.mask_recipe is None:
            return None
        drawn_step, future = self._next_masks or (None, None)
        host = future.result() if drawn_step == step else self._draw_masks(step, n_micro)
        self._next_masks = None
        if step + 1 < self.stop_step:
            self._next_masks = (step + 1, self._mask_thread.submit(self._draw_masks, step + 1, n_micro))
        return [masks.to(self.device) for masks in host]

    def _resume(self) -> Path | None:
        """Restore the state of the checkpoint to resume from, if any; returns its path."""
        found = checkpoint_to_resume(self.config.resume, self.run_dir, self.runtime)
        if found is None:
            return None
        path, payload = found
        if checkpoint_kind(payload) == "release":
            payload = self._as_fastdino_payload(path, payload)
        saved_world_size = len(payload["rng"])
        if saved_world_size and saved_world_size != self.runtime.world_size:
            payload = self._on_other_ranks(path, payload, saved_world_size)
        step = int(payload["step"])
        try:
            self.loader.load_state_dict(payload["data"])
            position_matches = self.loader.steps_done == step
        except ValueError:  # a position outside this run's epochs
            position_matches = False
        if not position_matches:
            raise ConfigError(
                f"{path} was written at optimizer step {step} with the loader at {payload['data']}, but "
                f"this run has {self.steps_per_epoch} steps of {self.loader.batches_per_step} batches per "
                f"epoch: batch_size_per_gpu, grad_accumulation_steps, the number of ranks or the data "
                f"changed; resume with the original settings or start a new output_dir")
        current = self.config.to_dict()
        changed = sorted(key for key, value in payload["config"].items()
                         if key not in ("resume", "max_steps") and current.get(key) != value)
        if changed:
            logger.warning(f"resuming with changed config keys: {', '.join(changed)}")
        saved_backends = payload.get("backends", {})
        changed = [f"{key} {saved_backends[key]} -> {value}" for key, value in self.backends.items()
                   if key in saved_backends and saved_backends[key] != value]
        if changed:
            logger.warning(f"resuming on other backends than {path} was trained on: {', '.join(changed)}; "
                           f"the run will not reproduce the uninterrupted one exactly")
        if path.is_dir():  # a sharded (DCP) checkpoint: loads on any number of ranks, sharded or not
            load_sharded_checkpoint(path, self.student, self.teacher, self.optimizer)
            restore_loss_state(payload["dino_loss"], self.center, self.patch_center)
        elif self.sharded:
            raise ConfigError(f"{path} is a whole-network checkpoint and this run is sharded "
                              f"(parallelism=fsdp): resume it with parallelism=ddp")
        else:
            restore_checkpoint(payload, student=self.student, teacher=self.teacher, optimizer=self.optimizer,
                               scaler=self.scaler, center=self.center, patch_center=self.patch_center)
        rng_states = payload["rng"]
        if len(rng_states) == self.runtime.world_size:
            restore_rng_state(rng_states[self.runtime.rank], self.device)
        else:
            logger.warning(f"{path} holds the RNG states of {len(rng_states)} ranks, this run has "
                           f"{self.runtime.world_size}: drop path draws will differ from the original run")
        logger.info(f"resumed from {path} at step {step} (epoch {payload['epoch']})")
        return path

    def _on_other_ranks(self, path: Path, payload: dict, saved_world_size: int) -> dict:
        """A checkpoint of another number of ranks, which only an epoch end can continue: each
        rank's part of an epoch, and so the steps per epoch, depend on the number of ranks."""
        epoch, data = int(payload["epoch"]), payload["data"]
        at_epoch_end = (data["epoch"], data["step"]) == (epoch, 0) or (data["epoch"] == epoch - 1 and data["step"] > 0)
        if not at_epoch_end:
            raise ConfigError(
                f"{path} was written by {saved_world_size} rank(s) in the middle of epoch {data['epoch']}; "
                f"this run has {self.runtime.world_size}: resume it on {saved_world_size} rank(s), or from "
                f"a checkpoint of an epoch end (--resume PATH)")
        logger.warning(f"{path} was written by {saved_world_size} rank(s), this run has {self.runtime.world_size}: "
                       f"continuing at the start of epoch {epoch}, step {epoch * self.steps_per_epoch} of this run")
        return self._at_epoch_start(payload, epoch)

    def _at_epoch_start(self, payload: dict, epoch: int) -> dict:
        """``payload`` with its step and data position moved to the first step of ``epoch`` of this run."""
        return {**payload, "step": epoch * self.steps_per_epoch, "data": {"epoch": epoch, "step": 0}}

    def _as_fastdino_payload(self, path: Path, payload: dict) -> dict:
        """A release checkpoint (written at the end of an epoch; its "epoch" is the next one) as
        the payload fastdino resumes from: that epoch's first step, no config to compare, no RNG
        states."""
        epoch = int(payload["epoch"])
        logger.info(f"{path} is a checkpoint of the public DINO release: resuming at the start of epoch {epoch}")
        return {**self._at_epoch_start(payload, epoch), "config": {}, "rng": []}

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        if self.start_step >= self.stop_step:
            logger.info(f"nothing to do: the run in {self.run_dir} is at step {self.start_step} "
                        f"(stop at {self.stop_step})")
            return self._result(self.start_step, None)
        progress = TrainingProgress(self.stop_step, self.start_step, self.run_dir, enabled=self.runtime.is_main,
                                    tensorboard=config.tensorboard, resumed_from=self.last_good_checkpoint)
        window = _MetricsWindow(self.device)
        last_metrics = None
        self.student.train()
        self.teacher.train()  # as the release: batch statistics in a convnet teacher
        self.stop_signals.install()
        try:
            for step, micro_batches in self._steps(window):
                done, epoch = step + 1, step // self.steps_per_epoch
                log_now = done % config.log_every_steps == 0 or done == self.stop_step
                self.waiting_in = f"optimizer step {done} (the gradient and center all-reduces)"
                result = self.step_fn(micro_batches, self.schedules.at(step),
                                      freeze_last_layer=epoch < config.freeze_last_layer, measure=log_now,
                                      masks=self._masks(step, len(micro_batches)))
                window.record(result, step)
                progress.advance(done, epoch)
                if log_now:
                    last_metrics = self._log(done, result, window, progress)
                run_or_epoch_ends = done == self.stop_step or done % self.steps_per_epoch == 0
                checkpoint_now = run_or_epoch_ends or (config.checkpoint_every_steps and
                                                       done % config.checkpoint_every_steps == 0)
                if checkpoint_now:
                    self._save_checkpoint(done, window)
                if run_or_epoch_ends:
                    self._export_backbone()
                self.waiting_in = f"the stop-signal all-reduce after step {done}"
                stopped_by = self.stop_signals.stop_now() if done < self.stop_step else None
                if stopped_by:
                    self._stop_on_signal(stopped_by, done, window, checkpoint_written=checkpoint_now)
                    return self._result(done, last_metrics, stopped_by)
            self.stop_signals.drain()
        except RuntimeError as error:
            if self.runtime.initialized and is_collective_timeout(error):
                raise self._timeout_error() from error
            raise
        finally:
            self._mask_thread.shutdown(cancel_futures=True)
            self.stop_signals.uninstall()
            progress.close()
        logger.info(f"done: {self.stop_step} steps. Checkpoint {self.run_dir / LATEST_CHECKPOINT_NAME}, "
                    f"teacher backbone {self.run_dir / BACKBONE_EXPORT_NAME}, metrics "
                    f"{self.run_dir / METRICS_FILE_NAME}, config {self.run_dir / CONFIG_FILE_NAME}")
        return self._result(self.stop_step, last_metrics)

    def _result(self, steps: int, last_metrics: dict | None, stopped_by: str | None = None) -> TrainResult:
        return TrainResult(self.run_dir, steps, last_metrics, self.student, self.teacher, self.center, stopped_by,
                           self.patch_center)

    def _stop_on_signal(self, signal_name: str, step: int, window: _MetricsWindow, checkpoint_written: bool) -> None:
        """Every rank, after the same ``step``: a checkpoint, and the marker a requeue script reads."""
        self.stop_signals.drain()
        if not checkpoint_written:
            self._save_checkpoint(step, window)
        if self.runtime.is_main:
            (self.run_dir / STOPPED_MARKER_NAME).write_text(json.dumps(
                {"signal": signal_name, "step": step, "checkpoint": str(self.last_good_checkpoint)}))
        logger.info(f"stopped by {signal_name} after step {step} of {self.stop_step}: checkpoint "
                    f"{self.last_good_checkpoint}; run the same command again to continue")

    def _steps(self, window: _MetricsWindow) -> Iterator[tuple[int, list]]:
        """The loader's (step, micro-batches) up to ``stop_step``, timing the wait for data."""
        steps = self.loader.steps()
        while True:
            waited_from = time.perf_counter()
            step, micro_batches = next(steps)
            window.data_wait += time.perf_counter() - waited_from
            yield step, micro_batches
            if step + 1 == self.stop_step:
                return

    # -- metrics, checkpoints, export --------------------------------------------------------------

    def _timeout_error(self) -> CollectiveTimeoutError:
        minutes = self.config.distributed_timeout_minutes
        missing = unresponsive_ranks(self.runtime, wait_seconds=min(60.0, minutes * 60))
        who = (f"rank(s) {missing} did not answer: stopped (SIGSTOP), stalled (a hung file system, a "
               f"deadlock) or dead" if missing else
               "every rank answered afterwards: one was slower than the limit (raise it)")
        kept = self.last_good_checkpoint or "none yet"
        return CollectiveTimeoutError(
            f"rank {self.runtime.rank}: {self.waiting_in} waited distributed_timeout_minutes={minutes:g} "
            f"for the other ranks; {who}. Last checkpoint: {kept}")

    def _raise_if_non_finite(self, window: _MetricsWindow) -> None:
        first = window.first_non_finite_step.clone()
        if self.runtime.initialized:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first_step = int(first)
        if first_step != _NOT_SEEN:
            kept = (f"the last good checkpoint is {self.last_good_checkpoint}" if self.last_good_checkpoint
                    else "no checkpoint was written before it")
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at optimizer step {first_step + 1} (epoch "
                f"{first_step // self.steps_per_epoch}); training stopped and {kept}. Lower lr, "
                f"raise warmup_epochs, use clip_grad, or try precision=bf16 instead of fp16")

    def _log(self, step: int, result: StepResult, window: _MetricsWindow, progress: TrainingProgress) -> dict:
        """Read the window's metrics (the one host sync of a log step) and report them."""
        self.waiting_in = f"the metrics all-reduce of step {step}"
        self._raise_if_non_finite(window)
        values = self.schedules.at(step - 1)
        # DINOv2: each term of the last step, and the patch targets' entropy
        extra = {f"{name}_loss": value for name, value in result.terms.items()}
        if result.patch_teacher_entropy is not None:
            extra["patch_teacher_entropy"] = result.patch_teacher_entropy
        statistics = torch.stack([window.loss_sum / window.steps, result.teacher_entropy.float(),
                                  result.kl_divergence.float(), *(value.float() for value in extra.values())])
        if self.runtime.initialized:
            dist.all_reduce(statistics)
            statistics /= self.runtime.world_size
        loss, entropy, kl_divergence, *extra_values = statistics.tolist()
        elapsed = time.perf_counter() - window.started
        metrics = {
            "step": step, "epoch": values.epoch, "loss": loss, "kl_divergence": kl_divergence,
            "teacher_entropy": entropy, "lr": values.learning_rate, "weight_decay": values.weight_decay,
            "teacher_momentum": values.teacher_momentum, "teacher_temperature": values.teacher_temperature,
            "images_per_second": window.steps * self.global_batch / elapsed,
            "data_wait_fraction": window.data_wait / elapsed,
            "peak_memory_gib": _peak_memory_gib(self.device),
        }
        metrics.update(zip(extra, extra_values))
        self._watch_collapse(metrics, step, "", self.collapse_monitor, entropy)
        if self.patch_collapse_monitor is not None and "patch_teacher_entropy" in metrics:
            self._watch_collapse(metrics, step, "patch_", self.patch_collapse_monitor,
                                 metrics["patch_teacher_entropy"])
        progress.log(metrics)
        window.reset()
        return metrics

    def _watch_collapse(self, metrics: dict, step: int, prefix: str, monitor: CollapseMonitor, entropy: float) -> None:
        """Add the collapse sign of one head to ``metrics``; say it when it starts, log it every time."""
        sign = monitor.sign(entropy, step)
        mode = sign[0] if sign else None
        if sign:
            head = "the iBOT head: " if prefix else ""
            metrics[f"{prefix}collapse_warning"] = head + sign[1]
            if mode != self.last_collapse_mode.get(prefix):
                logger.warning(f"at step {step}: {head}{sign[1]}")
        self.last_collapse_mode[prefix] = mode

    def _save_checkpoint(self, step: int, window: _MetricsWindow) -> None:
        self.waiting_in = f"the checkpoint of step {step} (its RNG-state gather)"
        self._raise_if_non_finite(window)  # never write a checkpoint of a diverged model
        rng_state = capture_rng_state(self.device)
        rng_states = [rng_state]
        if self.runtime.initialized:
            rng_states = [None] * self.runtime.world_size
            dist.all_gather_object(rng_states, rng_state)
        path = checkpoint_path(self.run_dir, step, sharded=self.sharded)
        state = dict(epoch=step // self.steps_per_epoch, step=step, config=self.config.to_dict(),
                     backends=dict(self.backends), data=self.loader.state_dict(), rng=rng_states)
        if self.sharded:  # every rank writes its shards
            save_sharded_checkpoint(path, self.student, self.teacher, self.optimizer,
                                    {**state, "dino_loss": loss_state(self.center, self.patch_center)})
        elif self.runtime.is_main:
            payload = build_checkpoint(
                student=self.student, teacher=self.teacher, optimizer=self.optimizer, scaler=self.scaler,
                center=self.center, epoch=state["epoch"], step=step, config=state["config"],
                backends=self.backends, data_state=state["data"], rng_states=rng_states,
                patch_center=self.patch_center)
            atomic_save(payload, path)
            point_latest_to(path)
        if self.runtime.is_main:
            prune_checkpoints(self.run_dir, self.config.keep_last_checkpoints)
            logger.info(f"checkpoint {path}")
        self.last_good_checkpoint = path

    def _export_backbone(self) -> None:
        if self.sharded:  # gathered on rank 0 (a collective)
            backbone = export_full_backbone_state_dict(self.teacher)
        else:
            backbone = export_backbone_state_dict(self.teacher) if self.runtime.is_main else None
        if self.runtime.is_main:
            atomic_save(backbone, self.run_dir / BACKBONE_EXPORT_NAME)
