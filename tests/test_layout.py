"""The repository's shape: every command is get_args_parser() + main(argv), and importing the library changes
nothing in the process (no environment, warnings or matplotlib settings)."""
import inspect
import os
import subprocess
import sys

import pytest
from cli_helpers import run_together

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["train", "evaluate", "predict", "export", "prune", "benchmark", "split_dataset", "plot"]


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_a_parser_and_a_main_taking_argv(name):
    module = __import__(name)
    assert callable(module.get_args_parser)
    params = inspect.signature(module.main).parameters
    assert list(params) == ["argv"] and params["argv"].default is None


def test_benchmark_modes_parse_with_their_own_flags():
    import benchmark

    args = benchmark.get_args_parser().parse_args(["infer", "--model", "mobilenet_v3_small", "--repeats", "3"])
    assert (args.mode, args.model, args.repeats) == ("infer", "mobilenet_v3_small", 3)
    with pytest.raises(SystemExit):
        benchmark.get_args_parser().parse_args(["train", "--variants", "x"])  # an infer-only flag


def test_importing_the_library_has_no_side_effects():
    code = """
import os, pkgutil, importlib, warnings, sys
import torch, torchvision, scipy.special, scipy.sparse  # third-party libraries install their own settings on import
env, filters = dict(os.environ), list(warnings.filters)
import utils, models, datasets
names = [m.name for p in (utils, models, datasets) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for name in names:
    importlib.import_module(name)
changed = {k for k, v in set(os.environ.items()) ^ set(env.items())}
assert not {k for k in changed if not k.startswith(("KMP_", "TORCH"))}, changed  # torch's own settings aside
assert list(warnings.filters) == filters
assert "matplotlib.pyplot" not in sys.modules
print(len(names))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 40


def test_process_settings_are_applied_before_torch_loads():
    """configure_process raises when torch is already loaded, so a command that imports torch (through any
    module) before applying its settings fails here instead of silently running with OpenMP's defaults."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    cmds = [["train.py"], ["evaluate.py"], ["predict.py"], ["benchmark.py", "train"]]
    for cmd, r in zip(cmds, run_together([[*cmd, "--help"] for cmd in cmds], env=env, timeout=300)):
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
