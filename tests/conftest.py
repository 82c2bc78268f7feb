"""Shared test fixtures (pyproject.toml puts the repository root on sys.path: pytest's ``pythonpath``)."""
import os

import pytest
from eval_helpers import one_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """Keep speed probes in a per-session cache (markers are registered in pyproject.toml)."""
    import tempfile

    # Speed probes (utils/machine.py) are cached per test session, not in the user's ~/.cache: runs inside one
    # session reuse one measurement, so two runs that must match bit for bit make the same automatic choices.
    os.environ.setdefault("MOBILENET_CACHE_DIR", tempfile.mkdtemp(prefix="mobilenet-cache-"))


@pytest.fixture
def single_thread():
    """One torch thread for the test (eval_helpers.one_thread): inference modules use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``, so results do not depend on the core count."""
    with one_thread():
        yield
