"""Shared test fixtures (pyproject.toml puts the repository root on sys.path: pytest's ``pythonpath``)."""
import os

import pytest
from eval_helpers import one_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CREATED = pytest.StashKey[list]()  # session cache folders this process made


def pytest_configure(config):
    """Per-session caches, and one share of the cores per pytest-xdist worker (markers: pyproject.toml)."""
    import tempfile

    # Caches live for one test session (xdist workers inherit the controller's environment), so a run on a
    # fresh CI box and a run here cost the same:
    # - speed probes (utils/machine.py), not the user's ~/.cache: runs inside one session reuse one measurement,
    #   so two runs that must match bit for bit make the same automatic choices;
    # - torch.compile's kernels, not /tmp/torchinductor_$USER: a warm cache left by an earlier session hid a
    #   90 s cold compile (tests/test_train.py's compiled run on a 2-core AVX2 EPYC).
    for var, prefix in (("MOBILENET_CACHE_DIR", "mobilenet-cache-"), ("TORCHINDUCTOR_CACHE_DIR", "inductor-")):
        if var not in os.environ:
            os.environ[var] = tempfile.mkdtemp(prefix=prefix)
            config.stash.setdefault(_CREATED, []).append(os.environ[var])
    # One OpenMP thread per test process when pytest-xdist runs one worker per core: each worker's torch would
    # otherwise start a thread per core and busy-wait them (libgomp's default spin), and train.main() sets its
    # threads to the core count unless OMP_NUM_THREADS is set. Two workers x two spinning threads on 2 cores made
    # in-process tests 3-5x slower (tests/test_train.py's Ctrl-C test 44 s -> 8 s, the suite 662 s -> 537 s on a
    # 2-core AVX2 EPYC). Workers and the commands tests start inherit it; a value already set wins.
    workers = getattr(config.option, "numprocesses", None)  # pytest-xdist's -n, "auto" already resolved
    if isinstance(workers, int) and workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


def pytest_unconfigure(config):
    """Remove the session caches this process created (the controller's; workers only inherited them)."""
    import shutil

    for path in config.stash.get(_CREATED, []):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def single_thread():
    """One torch thread for the test (eval_helpers.one_thread): inference modules use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``, so results do not depend on the core count."""
    with one_thread():
        yield
