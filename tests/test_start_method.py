"""DataLoader workers started with ``spawn`` (macOS and Windows) or ``forkserver`` (Linux from Python 3.14) get the
dataset and its transforms by pickling, not by fork: a lambda or a local function in any of them breaks those
users only. train.py (decode workers, and the feature pass of finetune.yaml's classifier phase), evaluate.py and
predict.py run here with 2 workers under ``spawn``, the stricter of the two (each worker also re-imports the
command's module)."""
import csv
import os

import pytest
from cli_helpers import run_together
from eval_helpers import link_sample_split

pytestmark = pytest.mark.slow

# the command runs as __main__ after the start method is set, as a user's `python train.py` would on macOS
LAUNCH = ("import multiprocessing as mp, runpy, sys; mp.set_start_method('spawn', force=True); "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
TINY = ["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--batch-size", "8", "--device", "cpu",
        "--set", "resize_size=32", "--set", "progress=false", "--pretrained", "none", "--workers", "2"]


def test_commands_with_spawned_workers(tmp_path):
    data = link_sample_split(str(tmp_path / "data"), 8, 4)
    runs = run_together([
        ["-c", LAUNCH, "train.py", *TINY, "--epochs", "1", "--set", "cache=none", "--data", data,
         "--out", str(tmp_path / "plain")],
        ["-c", LAUNCH, "train.py", *TINY, "--epochs", "1", "--freeze", "features", "--set", "cache_features=true",
         "--data", data, "--out", str(tmp_path / "features")],
    ])
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    plain, features = (r.stdout for r in runs)
    assert "workers: 2" in plain and "decoded and augmented in DataLoader workers" in plain, plain
    assert "only the linear head trains, on cached features" in features and "epoch 1/1" in features, features
    best = str(tmp_path / "plain" / "best.pt")
    ev, pr = run_together([
        ["-c", LAUNCH, "evaluate.py", best, os.path.join(data, "val"), "--workers", "2", "--no-progress",
         "--out", str(tmp_path / "eval")],
        ["-c", LAUNCH, "predict.py", best, os.path.join(data, "val"), "--workers", "2", "--no-progress",
         "--csv", str(tmp_path / "pred.csv")],
    ])
    assert ev.returncode == 0 and "n=40" in ev.stdout, ev.stderr[-3000:]
    assert pr.returncode == 0, pr.stderr[-3000:]
    with open(tmp_path / "pred.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 40
