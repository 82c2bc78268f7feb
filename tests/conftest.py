"""Make the repository root importable and give tests small shared fixtures."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    """Keep speed probes in a per-session cache (markers are registered in pytest.ini)."""
    import tempfile

    # Speed probes (utils/machine.py) are cached per test session, not in the user's ~/.cache: runs inside one
    # session reuse one measurement, so two runs that must match bit for bit make the same automatic choices.
    os.environ.setdefault("MOBILENET_CACHE_DIR", tempfile.mkdtemp(prefix="mobilenet-cache-"))
