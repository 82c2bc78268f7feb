"""Make the repository root importable and give tests small shared fixtures."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    """Register the markers used in this suite (``-m "not cuda"`` deselects the GPU-only tests)."""
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
