"""``build_multicrop_loader``: the images of a folder as batches of DINO multi-crop views.

Order: every epoch is a fresh permutation of the dataset drawn from (seed, epoch); shard k of n
takes every n-th image of it, so shards are disjoint, equally long, and together cover the epoch
(the at most n - 1 images left over are dropped, different ones each epoch). The loader's
position (epoch, step) is the next batch it will yield; ``state_dict`` saves it and a loader
restored from it continues with that batch, including its augmentation draws. One pipeline (or
one set of workers) streams batch after batch across epoch ends; it is rebuilt only when the
position is set to another place.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from fastdino.runtime import get_logger

from .image_files import DataLoadingError, ImageIndex, scan_images
from .recipe import MultiCropRecipe, batch_generator, sample_crop_parameters

DATA_BACKENDS = ("auto", "dali", "torchvision")
DATA_BACKEND_ENV_VAR = "FASTDINO_DATA_BACKEND"
logger = get_logger("data")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def resolve_data_backend(backend: str = "auto") -> str:
    """"dali" or "torchvision": ``FASTDINO_DATA_BACKEND`` when set, else ``backend``; "auto" is
    DALI when it imports."""
    requested = os.environ.get(DATA_BACKEND_ENV_VAR) or backend
    source = f"{DATA_BACKEND_ENV_VAR}={requested!r}" if os.environ.get(DATA_BACKEND_ENV_VAR) else f"backend={requested!r}"
    if requested not in DATA_BACKENDS:
        raise ValueError(f"{source}: choose one of {DATA_BACKENDS}")
    if requested == "auto":
        return "dali" if dali_available() else "torchvision"
    if requested == "dali" and not dali_available():
        from .dali_pipeline import import_dali

        import_dali()  # raises the ImportError that says how to install it
    return requested


class BatchPlan:
    """Which images make batch (epoch, step) of one shard, and that batch's augmentation draws."""

    def __init__(self, index: ImageIndex, batch_size: int, recipe: MultiCropRecipe, n_local_crops: int,
                 seed: int, shard_id: int, num_shards: int, drop_last: bool):
        self.index = index
        self.batch_size = batch_size
        self.recipe = recipe
        self.n_local_crops = n_local_crops
        self.seed = seed
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.images_per_shard = len(index) // num_shards
        full, partial = divmod(self.images_per_shard, batch_size)
        self.steps_per_epoch = full + (1 if partial and not drop_last else 0)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(index)} images over num_shards={num_shards} give "
                             f"{self.images_per_shard} per shard, fewer than batch_size={batch_size} "
                             f"(drop_last={drop_last}): no batch to train on")
        self._cached_epoch, self._cached_order = None, None

    def shard_order(self, epoch: int) -> np.ndarray:
        """Dataset indices of this shard in epoch ``epoch``, in the order they are used."""
        if epoch != self._cached_epoch:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.index))
            used = permutation[: self.images_per_shard * self.num_shards]
            self._cached_epoch, self._cached_order = epoch, used[self.shard_id :: self.num_shards]
        return self._cached_order

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        return self.shard_order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]

    def request(self, epoch: int, step: int):
        """(paths, crop draws) of batch (epoch, step)."""
        indices = self.batch_indices(epoch, step)
        generator = batch_generator(self.seed, epoch, self.shard_id, step)
        crops = sample_crop_parameters(self.recipe, self.n_local_crops, self.index.sizes[indices], generator)
        return [self.index.paths[i] for i in indices], crops

    def positions(self, epoch: int, step: int, steps_per_epoch: int) -> Iterator[tuple[int, int]]:
        """(epoch, step) from the given one onwards, ``steps_per_epoch`` of each epoch (at most
        ``self.steps_per_epoch``), across epoch ends, without end."""
        while True:
            for current in range(step, steps_per_epoch):
                yield epoch, current
            epoch, step = epoch + 1, 0


class MultiCropLoader:
    """Iterate for the rest of the current epoch's batches; each batch is a list of 2 + n_local
    crops (B, 3, S, S), global crops first. ``steps()`` goes on across epochs, in groups of
    ``batches_per_step`` batches (gradient accumulation). See ``build_multicrop_loader``."""

    def __init__(self, plan: BatchPlan, backend: str, device: torch.device, dtype: torch.dtype,
                 num_threads: int, batches_per_step: int = 1, prefetch_batches: int = 2):
        if not 1 <= batches_per_step <= plan.steps_per_epoch:
            raise ValueError(f"batches_per_step={batches_per_step}: an epoch of this shard has "
                             f"{plan.steps_per_epoch} batches of batch_size={plan.batch_size}")
        self.plan = plan
        self.backend_name = backend
        self.device = device
        self.dtype = dtype
        self.num_threads = num_threads
        self.prefetch_batches = prefetch_batches
        self.batches_per_step = batches_per_step
        # An epoch's leftover batches that do not fill a step are never read.
        self.steps_per_epoch = plan.steps_per_epoch // batches_per_step
        self.epoch, self.step = 0, 0
        self._stream, self._stream_position = None, None

    @property
    def backend(self) -> str:
        """"dali-gpu", "dali-cpu" or "torchvision"."""
        if self.backend_name == "dali":
            return "dali-gpu" if self.device.type == "cuda" else "dali-cpu"
        return "torchvision"

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch * self.batches_per_step

    def state_dict(self) -> dict:
        """The position of the next batch: its epoch and its index in the epoch ("step")."""
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= len(self):
            raise ValueError(f"loader position epoch={epoch}, step={step} is outside an epoch of "
                             f"{len(self)} batches")
        if step % self.batches_per_step:
            raise ValueError(f"loader position step={step} is not the first batch of a group of "
                             f"batches_per_step={self.batches_per_step}")
        self.epoch, self.step = (epoch + 1, 0) if step == len(self) else (epoch, step)

    def set_epoch(self, epoch: int) -> None:
        self.load_state_dict({"epoch": epoch, "step": 0})

    @property
    def steps_done(self) -> int:
        """Groups of ``batches_per_step`` batches before the current position, over all epochs."""
        return self.epoch * self.steps_per_epoch + self.step // self.batches_per_step

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        return itertools.islice(self._batches(), len(self) - self.step)

    def steps(self) -> Iterator[tuple[int, list[list[torch.Tensor]]]]:
        """(step, batches) without end: the index of each group of ``batches_per_step``
        consecutive batches over all epochs (``steps_done`` before it), and its batches."""
        batches = self._batches()
        while True:
            step = self.steps_done
            yield step, [next(batches) for _ in range(self.batches_per_step)]

    def _batches(self) -> Iterator[list[torch.Tensor]]:
        """Batches from the current position on, across epoch ends."""
        while True:
            if self._stream_position != (self.epoch, self.step):
                self._restart_stream()
            batch = next(self._stream)
            self.step += 1
            if self.step == len(self):
                self.epoch, self.step = self.epoch + 1, 0
            self._stream_position = (self.epoch, self.step)
            yield batch

    def _restart_stream(self):
        self._stream = None  # release the previous pipeline or workers first
        positions = self.plan.positions(self.epoch, self.step, len(self))
        if self.backend_name == "dali":
            self._stream = _dali_stream(self.plan, positions, self.device, self.dtype, self.num_threads,
                                        self.prefetch_batches)
        else:
            self._stream = _torchvision_stream(self.plan, positions, self.device, self.dtype, self.num_threads)
        self._stream_position = (self.epoch, self.step)


def dali_batch_inputs(plan: BatchPlan, epoch: int, step: int):
    """(paths, inputs) of batch (epoch, step), where inputs are what the DALI pipeline's external
    source takes (``build_dali_pipeline``): the files' bytes, every crop's parameter rows and
    colour maps. The host's share of a batch, a pure function of its position."""
    from .dali_pipeline import pack_crop_parameters

    paths, crops = plan.request(epoch, step)
    encoded = []
    for path in paths:
        try:
            encoded.append(np.fromfile(path, dtype=np.uint8))
        except OSError as error:
            raise DataLoadingError(f"could not read {path!r}, an image of batch epoch={epoch}, step={step} "
                                   f"({type(error).__name__}: {error}); it was readable when the dataset "
                                   f"was scanned") from error
    return paths, (encoded, *pack_crop_parameters(crops, plan.recipe.blur_kernel_size))


class _Raised:
    """An exception of the worker thread, handed over in place of its item."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class _PrefetchThread(threading.Thread):
    def __init__(self, make_items, depth: int, name: str):
        super().__init__(name=name, daemon=True)
        self.make_items = make_items
        self.ready = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.start()

    def run(self):
        items = None
        try:
            items = self.make_items()
            for item in items:
                if not self._hand_over(item):
                    break
            else:
                self._hand_over(_END)
        except BaseException as error:
            self._hand_over(_Raised(error))
        finally:
            if hasattr(items, "close"):
                items.close()  # its clean-up runs in the thread that ran it

    def _hand_over(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def prefetch_in_thread(make_items, depth: int, name: str = "fastdino-prefetch") -> Iterator:
    """The items of the iterator ``make_items()``, which a worker thread creates and runs, keeping
    up to ``depth`` items ready. An exception there is raised here, in its item's place; closing
    this generator stops the worker and waits for it."""
    if depth < 1:
        raise ValueError(f"prefetch depth {depth}: must be >= 1")
    worker = _PrefetchThread(make_items, depth, name)
    try:
        while (item := worker.ready.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        worker.stopping.set()
        worker.join()


def _dali_batches(plan: BatchPlan, positions, device, dtype, num_threads) -> Iterator[list[torch.Tensor]]:
    """The DALI pipeline's batches, driven by the thread that iterates this (``_dali_stream``)."""
    from .dali_pipeline import build_dali_pipeline, dali_outputs_to_torch

    in_flight = collections.deque()  # paths of the batches fed and not yet returned, for errors
    failed = []  # the error of the batch whose inputs could not be made

    def next_batch_inputs():
        try:
            paths, inputs = dali_batch_inputs(plan, *next(positions))
        except Exception as error:
            # DALI's end of data: it still hands out the batches fed before this one, and the
            # error comes in this batch's place
            failed.append(error)
            raise StopIteration from error
        in_flight.append(paths)
        return inputs

    on_gpu = device.type == "cuda"
    pipeline = build_dali_pipeline(
        next_batch_inputs, plan.recipe, plan.n_local_crops, plan.batch_size, num_threads,
        device_id=device.index if on_gpu else None, half_precision=dtype in (torch.float16, torch.bfloat16))
    if on_gpu:
        torch.cuda.set_device(device)  # this thread's own current device
        copy_stream = torch.cuda.Stream(device)
    while True:
        try:
            outputs = pipeline.run()
        except StopIteration:
            break
        except Exception as error:
            paths = in_flight[0] if in_flight else []
            raise DataLoadingError(
                f"DALI failed on a batch of these {len(paths)} files: {paths}. If the error below "
                f"is a decoding error, one of them is corrupt beyond its header (the torchvision "
                f"backend names the file): remove it.\n{type(error).__name__}: {error}") from error
        in_flight.popleft()
        if on_gpu:
            with torch.cuda.stream(copy_stream):
                batch = dali_outputs_to_torch(outputs, device, dtype)
            # done before DALI's next run may reuse its output buffers, and before the training
            # thread gets the batch: this thread waits, not the training thread
            copy_stream.synchronize()
        else:
            batch = dali_outputs_to_torch(outputs, device, dtype)
        yield batch
    raise failed[0]  # in the place of the batch whose inputs failed


def _dali_stream(plan: BatchPlan, positions, device, dtype, num_threads, prefetch_batches):
    """DALI's batches, ``prefetch_batches`` of them kept ready by a worker thread that does the
    host's whole share of a batch (reading its files, the crop draws and colour maps, feeding
    DALI, waiting for it, copying its outputs): the training thread only takes finished batches.

    A thread rather than DALI's parallel external source: that source's worker processes would
    take over the reads, draws and maps only, while feeding DALI and copying its outputs (about
    1.5 ms a batch) stay with the thread that runs the pipeline, the training thread; and they
    cost seconds of start-up at every restart of the stream (spawned: DALI refuses to fork once
    CUDA is initialized). The thread's price is the GIL: its few milliseconds of Python a batch
    (benchmarks/bench_data.py) are taken from a training thread running Python at the same
    time; the reads, NumPy's larger operations and the waits on DALI release it."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the training thread's
    batches = prefetch_in_thread(lambda: _dali_batches(plan, positions, device, dtype, num_threads),
                                 prefetch_batches, name="fastdino-dali")
    try:
        for batch in batches:
            if device.type == "cuda":
                # made on the worker's stream: the allocator must not hand the memory out again
                # before the training stream is done with it
                for tensor in batch:
                    tensor.record_stream(torch.cuda.current_stream(device))
            yield batch
    finally:
        batches.close()


class _Requests(torch.utils.data.Sampler):
    """The DataLoader's 'indices': one (paths, crop draws) request per batch, without end."""

    def __init__(self, plan: BatchPlan, positions):
        self.plan = plan
        self.positions = positions

    def __iter__(self):
        for position in self.positions:
            yield self.plan.request(*position)


def _torchvision_stream(plan: BatchPlan, positions, device, dtype, num_threads):
    from .torchvision_pipeline import MultiCropBatches, normalize_uint8_crops

    on_gpu = device.type == "cuda"
    dataset = MultiCropBatches(plan.recipe, plan.recipe.crop_sizes(plan.n_local_crops))
    workers = num_threads if num_threads > 1 else 0
    # forkserver, not fork: forking a process whose DALI, OpenMP or CUDA threads hold locks can
    # deadlock the workers
    # its own generator: a DataLoader draws its workers' base seed from the global RNG
    # otherwise, which would shift the training's random draws whenever the stream restarts
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=_Requests(plan, positions),
                                         num_workers=workers, pin_memory=on_gpu,
                                         multiprocessing_context="forkserver" if workers else None,
                                         generator=torch.Generator().manual_seed(plan.seed))
    for uint8_crops in loader:
        yield normalize_uint8_crops(uint8_crops, plan.recipe, device, dtype)


def default_num_threads() -> tuple[int, str]:
    """(threads, how they were chosen): this process's cores shared by the ranks on its node.
    Every rank's DALI would otherwise start a thread per core of the node."""
    cores = len(os.sched_getaffinity(0))
    setting = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        local_world_size = int(setting)
    except ValueError:
        local_world_size = 0
    if local_world_size < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={setting!r}: expected the number of ranks on this node, >= 1")
    threads = max(1, cores // local_world_size)
    return threads, f"{threads} threads ({cores} cores / LOCAL_WORLD_SIZE={local_world_size})"


def build_multicrop_loader(data_path, batch_size: int, *, n_local_crops: int = 8, backend: str = "auto",
                           device=None, dtype: torch.dtype = torch.float32, shard_id: int = 0,
                           num_shards: int = 1, seed: int = 0, num_threads: int | None = None,
                           recipe: MultiCropRecipe | None = None, skip_bad_files: bool = False,
                           drop_last: bool = True, batches_per_step: int = 1,
                           verbose: bool = True, prefetch_batches: int = 2, cache_dir=None,
                           runtime=None) -> MultiCropLoader:
    """DINO multi-crop batches of the JPEG/PNG images under ``data_path``.

    data_path: an image folder (class subfolders or flat) or a text file listing image paths.
    Each batch: ``2 + n_local_crops`` tensors (batch_size, 3, S, S) of ``dtype`` on ``device``
    (default: the current CUDA device if there is one, else the CPU), normalized, global crops
    first. ``recipe`` sets crop sizes, scales and probabilities (default: the release's).
    backend: "dali" (on the GPU when ``device`` is CUDA, else DALI's CPU operators),
    "torchvision" (PIL in ``num_threads`` worker processes) or "auto" (DALI when installed);
    the environment variable ``FASTDINO_DATA_BACKEND`` overrides it.
    shard_id / num_shards: this rank's part of every epoch (torch.distributed rank and world
    size). Every file is checked before the first batch: bad ones raise ``ImageFolderError``
    naming them, or are left out and counted with ``skip_bad_files=True``.
    batches_per_step: the micro-batches of one optimizer step (gradient accumulation), which
    ``MultiCropLoader.steps`` yields together; an epoch then ends after the last full group.
    num_threads: DALI's CPU threads or the torchvision backend's worker processes; by default
    this process's cores (``os.sched_getaffinity``) divided by ``LOCAL_WORLD_SIZE`` (the ranks
    on this node, as torchrun sets it), at least 1.
    prefetch_batches: DALI backend: finished batches a worker thread keeps ready (it reads the
    files, draws the crops and drives DALI off the training thread); the batches do not depend
    on it.
    cache_dir, runtime: where the checked index of the dataset is cached, and the job's
    ``fastdino.runtime.Runtime`` (rank 0 then scans for every rank): see ``scan_images``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if n_local_crops < 0:
        raise ValueError(f"n_local_crops={n_local_crops}: must be >= 0")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype}: choose torch.float32, torch.float16 or torch.bfloat16")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    chosen = resolve_data_backend(backend)
    if prefetch_batches < 1:
        raise ValueError(f"prefetch_batches={prefetch_batches}: must be >= 1")
    threads_source = f"{num_threads} threads"
    if num_threads is None:
        num_threads, threads_source = default_num_threads()
    elif num_threads < 1:
        raise ValueError(f"num_threads={num_threads}: must be >= 1")
    index = scan_images(data_path, skip_bad_files=skip_bad_files, verbose=verbose and shard_id == 0,
                        cache_dir=cache_dir, runtime=runtime)
    plan = BatchPlan(index, batch_size, recipe or MultiCropRecipe(), n_local_crops, seed, shard_id,
                     num_shards, drop_last)
    loader = MultiCropLoader(plan, chosen, device, dtype, num_threads, batches_per_step, prefetch_batches)
    if verbose and shard_id == 0:
        skipped = f", {len(index.skipped)} bad files skipped" if index.skipped else ""
        logger.info(f"{loader.backend} backend, {len(index)} images{skipped}, {num_shards} shard(s) of "
                    f"{len(loader)} batches of {batch_size}, 2+{n_local_crops} crops, {threads_source}")
    return loader
