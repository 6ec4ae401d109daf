"""Checkpoints that survive being killed: atomic writes, the newest K kept, exact resume.

Files in the run directory:

- ``checkpoint-step<N>.pth``: the state after N optimizer steps, written to a temporary file
  (``<name>.partial-<pid>``), flushed to disk, then renamed over the final name (a rename is atomic), so a write
  interrupted at any moment leaves the previous checkpoints untouched;
- ``checkpoint.pth``: the newest of them (a hard link, or a copy where links are not
  supported), the name the release's evaluation scripts expect;
- ``teacher_backbone.pth``: the teacher backbone alone (timm / release ViT keys).

A checkpoint holds ``student`` and ``teacher`` in the release's layout
(``fastdino.models.export_dino_checkpoint``), ``optimizer``, ``fp16_scaler``, ``epoch`` (of the
next step), ``step`` (optimizer steps done), ``config``, ``backends`` (what ran:
``fastdino.train.config.resolve_backends``), ``dino_loss`` (``{"center": ...}``, as the release
saves it), ``data`` (the loader's position) and ``rng`` (every rank's RNG states). Everything in
it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastdino.models import export_dino_checkpoint, load_dino_checkpoint, read_checkpoint
from fastdino.runtime import PARTIAL_MARKER, Runtime, get_logger, partial_path

from .config import ConfigError

LATEST_CHECKPOINT_NAME = "checkpoint.pth"
BACKBONE_EXPORT_NAME = "teacher_backbone.pth"
REPLACED_FOLDER_PREFIX = "replaced-"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-step(\d+)\.(pth|dcp)$")  # .dcp: a sharded run's directory
logger = get_logger("train")


def checkpoint_path(run_dir: Path, step: int, sharded: bool = False) -> Path:
    """A file of the whole state, or for a sharded (FSDP2) run a torch.distributed.checkpoint
    directory: each rank's shards, and the rest in ``extra.pth``."""
    return Path(run_dir) / f"checkpoint-step{step:09d}.{'dcp' if sharded else 'pth'}"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def point_latest_to(path: Path) -> None:
    """Make ``checkpoint.pth`` the newest checkpoint, atomically (hard link, else a copy)."""
    latest = path.parent / LATEST_CHECKPOINT_NAME
    temporary = partial_path(latest)
    temporary.unlink(missing_ok=True)
    try:
        os.link(path, temporary)
    except OSError:
        shutil.copyfile(path, temporary)
    os.replace(temporary, latest)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and (entry.is_file() if match.group(2) == "pth" else entry.is_dir()):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        _remove(path)


def remove_partial_files(run_dir: Path) -> None:
    """Delete temporary files of writes that were interrupted (a killed run leaves them)."""
    for entry in Path(run_dir).glob(f"*{PARTIAL_MARKER}*"):
        _remove(entry)


def unreadable_reason(error: Exception) -> str:
    """torch.load's error in one line, without its advice to unpickle untrusted code."""
    message = str(error).strip()
    if message.startswith("Weights only load failed"):
        # torch's paragraph of advice, then what the unpickler actually met
        detail = message.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        detail = " ".join(detail.split()) or "an object that is not a tensor or a plain container"
        return f"not a file of tensors and plain containers (torch's weights-only unpickler: {detail})"
    first_line = message.splitlines()[0] if message else ""
    return f"{type(error).__name__}: {first_line}".removesuffix(":").strip()


def checkpoint_kind(payload) -> str | None:
    """"fastdino", "release" (the public DINO's checkpoint.pth) or None (neither)."""
    if not isinstance(payload, dict) or not {"student", "teacher", "optimizer"} <= payload.keys():
        return None
    if {"step", "data"} <= payload.keys():
        return "fastdino"
    return "release" if "epoch" in payload else None


def read_resumable(path: Path) -> dict:
    """The payload of a fastdino or release checkpoint at ``path``; ConfigError (one line, naming
    the file and why) for anything else. For a sharded run's directory: what it holds besides
    the networks and the optimizer (step, data position, RNG states, center, ...)."""
    if path.is_dir():
        return _read_sharded_extra(path)
    try:
        payload = read_checkpoint(path)
    except Exception as error:  # truncated, corrupt, not a torch file
        raise ConfigError(f"cannot resume from {path}: {unreadable_reason(error)}") from None
    if checkpoint_kind(payload) is None:
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ConfigError(f"cannot resume from {path}: neither a fastdino nor a release DINO checkpoint "
                          f"(top-level keys {keys})")
    return payload


def _read_sharded_extra(path: Path) -> dict:
    from .sharding import EXTRA_FILE_NAME

    if not (path / ".metadata").is_file():
        raise ConfigError(f"cannot resume from {path}: a directory without torch.distributed.checkpoint's "
                          f".metadata (an interrupted or foreign save)")
    try:
        extra = read_checkpoint(path / EXTRA_FILE_NAME)
    except Exception as error:
        raise ConfigError(f"cannot resume from {path}: its {EXTRA_FILE_NAME}: {unreadable_reason(error)}") from None
    if not isinstance(extra, dict) or not {"step", "data", "rng", "dino_loss"} <= extra.keys():
        raise ConfigError(f"cannot resume from {path}: not a checkpoint of a sharded fastdino run")
    return extra


def resumable_files(run_dir: Path) -> list[Path]:
    """What ``resume=auto`` may continue from, newest first: the step checkpoints, else a lone
    ``checkpoint.pth`` (the release's name: a folder from the release, or copied by hand)."""
    return [path for _, path in reversed(list_checkpoints(run_dir))] or _latest_file(run_dir)


def _latest_file(run_dir: Path) -> list[Path]:
    """``[checkpoint.pth]`` when the folder holds that file, else []."""
    latest = Path(run_dir) / LATEST_CHECKPOINT_NAME
    return [latest] if latest.is_file() else []


def newest_resumable_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint of ``run_dir``, falling back past unreadable ones; when
    there are checkpoints and none can be read, ConfigError listing each and why."""
    failures, candidates = [], resumable_files(run_dir)
    for path in candidates:
        try:
            return path, read_resumable(path)
        except ConfigError as error:
            if path != candidates[-1]:
                logger.warning(f"{error}; trying the previous checkpoint")
            failures.append(str(error).removeprefix("cannot resume from "))
    if failures:
        raise ConfigError(
            f"{run_dir} holds checkpoints but none can be resumed from:\n  " + "\n  ".join(failures)
            + f"\nresume=restart starts over at step 0 (the files are moved to "
              f"{run_dir}/{REPLACED_FOLDER_PREFIX}<time>, not deleted)")
    return None


def set_aside_checkpoints(run_dir: Path) -> Path | None:
    """Move every checkpoint of ``run_dir`` into a new ``replaced-<time>`` folder (resume=restart):
    a run never overwrites a checkpoint it did not write."""
    files = [path for _, path in list_checkpoints(run_dir)] + _latest_file(run_dir)
    if not files:
        return None
    folder = Path(run_dir) / f"{REPLACED_FOLDER_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir()
    for path in files:
        os.replace(path, folder / path.name)
    return folder


def checkpoint_to_resume(resume: str, run_dir: Path, runtime: Runtime) -> tuple[Path, dict] | None:
    """(path, payload) of the checkpoint ``resume`` asks for, the same on every rank, or None.

    resume: "auto" (the newest readable one in ``run_dir``), "never", "restart" (start at step 0,
    the existing checkpoints moved aside) or a path. Rank 0 chooses (reading it proves it is
    intact) and tells the others, so that every rank resumes from the same file, which must be
    on a file system all nodes share; an error is raised on every rank alike.
    """
    if resume == "never":
        return None
    if resume not in ("auto", "restart"):
        return Path(resume), read_resumable(Path(resume))
    found, message = None, None
    if runtime.is_main:
        if resume == "restart":
            folder = set_aside_checkpoints(run_dir)
            if folder is not None:
                logger.warning(f"resume=restart: starting at step 0; the checkpoints that were in {run_dir} "
                               f"are now in {folder}")
        else:
            try:
                found = newest_resumable_checkpoint(run_dir)
            except ConfigError as error:
                message = str(error)
    chosen = [str(found[0]) if found else None, message]
    if runtime.initialized:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[1] is not None:
        raise ConfigError(chosen[1])
    if chosen[0] is None:
        return None
    if found is not None:
        return found
    path = Path(chosen[0])
    if not path.is_file():
        raise FileNotFoundError(f"rank {runtime.rank} cannot see {path}: output_dir must be on a "
                                f"file system that every node shares")
    return path, read_resumable(path)


def capture_rng_state(device: torch.device) -> dict:
    """This process's RNG states: torch (CPU), the CUDA device's, and Python's ``random``."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal_state, gauss_next = state["python"]
    random.setstate((version, tuple(internal_state), gauss_next))


def build_checkpoint(*, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler, center: torch.Tensor, epoch: int, step: int, config: dict,
                     backends: dict, data_state: dict, rng_states: list[dict],
                     patch_center: torch.Tensor | None = None) -> dict:
    """The checkpoint payload (see the module docstring); ``patch_center``: DINOv2's iBOT center."""
    return export_dino_checkpoint(
        student, teacher,
        optimizer=optimizer.state_dict(),
        fp16_scaler=scaler.state_dict() if scaler is not None else None,
        epoch=epoch, step=step, config=config, backends=dict(backends),
        dino_loss=loss_state(center, patch_center),
        data=dict(data_state), rng=rng_states,
    )


def loss_state(center: torch.Tensor, patch_center: torch.Tensor | None = None) -> dict:
    """The checkpoint's "dino_loss" entry: the center (as the release), and DINOv2's iBOT center."""
    state = {"center": center.detach().cpu()}
    if patch_center is not None:
        state["patch_center"] = patch_center.detach().cpu()
    return state


def restore_loss_state(state: dict, center: torch.Tensor, patch_center: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        center.copy_(state["center"])
        if patch_center is not None:
            if "patch_center" not in state:
                raise ValueError("the checkpoint has no iBOT patch center: it was not written by a method=dinov2 run")
            patch_center.copy_(state["patch_center"])


def restore_checkpoint(payload: dict, *, student: nn.Module, teacher: nn.Module,
                       optimizer: torch.optim.Optimizer, scaler, center: torch.Tensor,
                       patch_center: torch.Tensor | None = None) -> None:
    """Load networks, optimizer, scaler and centers from a payload of ``build_checkpoint``."""
    load_dino_checkpoint(student, payload, part="student")
    load_dino_checkpoint(teacher, payload, part="teacher")
    # load_state_dict replaces each group's keys with the saved ones: keep fastdino's own markers
    # (which groups get weight decay), absent from a release checkpoint's groups.
    markers = [{key: group[key] for key in ("apply_weight_decay", "lr_multiplier") if key in group}
               for group in optimizer.param_groups]
    optimizer.load_state_dict(payload["optimizer"])
    for group, marker in zip(optimizer.param_groups, markers):
        group.update(marker)
    if scaler is not None and payload.get("fp16_scaler"):
        scaler.load_state_dict(payload["fp16_scaler"])
    restore_loss_state(payload["dino_loss"], center, patch_center)
