"""Shared test set-up: the Triton interpreter on CPU-only machines, opt-in slow tests, backends."""

import os
import random
import socket
import tempfile
import zlib

import numpy as np
import torch

# Triton decides at decoration time whether a kernel is interpreted, so this must be set before
# anything imports fastdino.kernels. Without a GPU the "triton" backend then runs on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests choose backends themselves; a process-wide override would silently redirect them.
for variable in ("FASTDINO_BACKEND", "FASTDINO_ATTENTION", "FASTDINO_DATA_BACKEND"):
    os.environ.pop(variable, None)
# Image indexes go to a folder of this test session (and of the processes it starts), not to
# the user's ~/.cache: no test reads an index another run left.
os.environ["FASTDINO_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastdino-test-cache-")

import pytest  # noqa: E402

from fastdino.ops import backend_status  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def pytest_sessionstart(session):
    # CI must exercise the compiled backends: a broken build must fail, not skip quietly.
    if os.environ.get("CI") == "true":
        status = backend_status()
        broken = {name: why for name, why in status.items() if name in ("cpp", "triton") and why != "available"}
        if broken:
            raise pytest.UsageError(f"CI=true but fused backends are unavailable: {broken}")
        from fastdino.data import dali_available

        if not dali_available():
            raise pytest.UsageError("CI=true but DALI does not import: the DALI data backend would go untested")


def backend_params(*names):
    """pytest params for backends, skipped (with the reason) where a backend cannot run."""
    status = backend_status()
    return [
        pytest.param(name, marks=pytest.mark.skipif(status[name] != "available", reason=status[name]))
        for name in names
    ]


@pytest.fixture
def device(backend):
    """Where a backend's tensors live: CUDA for "triton" when there is a GPU, else the CPU
    (the Triton interpreter in CI)."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# Seeds. Each test has its own fixed seed, crc32 of (base seed, node id): the same verdict on
# every run, and tests do not share random inputs. FASTDINO_TEST_SEED=<int> sets the base seed,
# FASTDINO_TEST_SEED=random draws a fresh base per test (to find tests that pass only by luck);
# either way the test prints the setting that replays it.
SEED_VARIABLE = "FASTDINO_TEST_SEED"


def base_seed() -> int:
    setting = os.environ.get(SEED_VARIABLE, "").strip()
    if setting == "random":
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(setting or 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VARIABLE}={setting!r}: expected an integer or 'random'") from None


def mix_seed(base: int, nodeid: str) -> int:
    """A 32-bit seed from the base seed and the node id (zlib.crc32: stable across processes,
    unlike Python's salted hash)."""
    return zlib.crc32(f"{base}/{nodeid}".encode())


def pytest_configure(config):
    base_seed()  # a malformed FASTDINO_TEST_SEED stops the run before any test


@pytest.fixture(autouse=True)
def random_seed(request) -> int:
    """This test's seed. It also seeds the global torch, numpy and random generators (from a
    derived value, so they do not repeat ``generator``'s draws): model initialization, drop-path
    and any draw without an explicit generator are fixed too."""
    base = base_seed()
    seed = mix_seed(base, request.node.nodeid)
    print(f"seed {seed} for {request.node.nodeid}; replay: "
          f"{SEED_VARIABLE}={base} python -m pytest '{request.node.nodeid}'")
    global_seed = mix_seed(base, request.node.nodeid + "/global")
    torch.manual_seed(global_seed)
    np.random.seed(global_seed)
    random.seed(global_seed)
    return seed


@pytest.fixture
def generator(random_seed) -> torch.Generator:
    """A CPU torch generator seeded with this test's seed."""
    return torch.Generator().manual_seed(random_seed)


@pytest.fixture
def numpy_generator(random_seed) -> np.random.Generator:
    """A numpy generator seeded with this test's seed."""
    return np.random.default_rng(random_seed)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (building and training ViTs on a shared 2-core machine);
    modules that need it for every test say ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
