"""torchrun with 2 CPU processes (gloo) on real Fashion-MNIST sample images: Ctrl-C mid-epoch and resume is
bit-exact (each process's own dropout/mixup RNG state and sums are saved and restored), and cached features
are encoded once per image across the processes, then gathered identically to a 1-process run.

The processes run tests/torchrun_driver.py (train.py's main plus test hooks) with one OpenMP thread each.
"""

import pytest
import torch
from eval_helpers import link_sample_split
from test_train import _max_diff, _rows
from torchrun_driver import launch as _run

import train
from utils.checkpoint import load_checkpoint
from utils.errors import UserError

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

TINY = ["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--set", "resize_size=32", "--set", "progress=false", "--set", "amp=off"]
# dropout 0.2 (the default) and mixup: both draw from each process's own global RNG every step
RECIPE = ["--epochs", "3", "--lr", "0.02", "--set", "warmup_epochs=1", "--set", "ema_decay=0.9",
          "--set", "mixup_alpha=0.2", "--set", "label_smoothing=0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 80 train images: 5 global batches of 2 x 8 per epoch (a last batch of 2 per process made BatchNorm diverge)
    return link_sample_split(str(tmp_path_factory.mktemp("fmnist")), 8, 4)


def test_ctrl_c_under_torchrun_then_resume_is_exact(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(TINY + RECIPE + ["--data", data, "--out", str(full)], 2)

    # Only rank 1 gets SIGINT, before its 8th step (3rd of epoch 2). With Ctrl-C checked every 2 steps (as on a
    # GPU, where it is checked when the sums are read), both processes stop after the 4th step of epoch 2.
    r = _run(TINY + RECIPE + ["--data", data, "--out", str(cut)], 2,
             {"SIGINT_RANK": "1", "SIGINT_AT_STEP": "7", "SYNC_EVERY": "2"}, ok=False)
    assert r.returncode != 0 and "interrupted in epoch 2 after 4 steps" in r.stderr, r.stderr[-3000:]
    ck = load_checkpoint(str(cut / "last.pt"))
    part = ck["partial_epoch"]
    assert ck["epoch"] == 1 and ck["step"] == 9 and part["batches_done"] == 4 and part["world_size"] == 2
    r0, r1 = part["ranks"]
    # each process's own state: different RNG streams (seeded per rank) and different shares of the sums
    assert not torch.equal(r0["rng"]["torch"], r1["rng"]["torch"])
    assert torch.equal(r0["rng"]["torch"], ck["rng"]["torch"])  # the top-level state is rank 0's
    assert r0["seen"] == r1["seen"] == 4 * 8 and r0["loss_sum"] != r1["loss_sum"]
    assert (part["loss_sum"], part["seen"]) == (r0["loss_sum"], r0["seen"])

    # a 2-process mid-epoch checkpoint cannot continue in 1 process (each one's share of the epoch differs)
    with pytest.raises(UserError, match=r"by 2 process\(es\).*torchrun --nproc_per_node=2 train.py --resume"):
        train.main(["--resume", str(cut / "last.pt")])

    # Resumed, rank 1 gets SIGINT again during the last step of epoch 2, after the last in-epoch check (every 4
    # steps): both stop after that epoch's checkpoint.
    r = _run(["--resume", str(cut / "last.pt")], 2, {"SIGINT_RANK": "1", "SIGINT_AT_STEP": "0", "SYNC_EVERY": "4"},
             ok=False)
    assert r.returncode != 0 and "interrupted after epoch 2" in r.stderr, r.stderr[-3000:]
    ck = load_checkpoint(str(cut / "last.pt"))
    assert ck["epoch"] == 2 and ck["step"] == 10 and ck["partial_epoch"] is None

    _run(["--resume", str(cut / "last.pt")], 2)
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(cut / "last.pt"))
    assert a["step"] == b["step"] == 15 and b["partial_epoch"] is None
    assert _max_diff(a["model"], b["model"]) == 0 and _max_diff(a["ema"], b["ema"]) == 0
    assert _rows(str(full / "log.csv")) == _rows(str(cut / "log.csv"))


def test_cached_features_are_sharded_then_gathered_in_order(data, tmp_path):
    args = TINY + ["--epochs", "1", "--lr", "0.05", "--data", data, "--freeze", "features", "--pretrained", "none",
                   "--set", "cache_features=true"]
    _run(args + ["--out", str(tmp_path / "one")], 1, {"DUMP_FEATURES": str(tmp_path / "f1")})
    _run(args + ["--out", str(tmp_path / "two")], 2, {"DUMP_FEATURES": str(tmp_path / "f2")})
    one = torch.load(str(tmp_path / "f1" / "rank0.pt"), weights_only=True)
    ranks = [torch.load(str(tmp_path / "f2" / f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    assert one["train_x"].shape == (80, 1280) and one["val_x"].shape == (40, 1280) and one["encoded"] == 120
    assert [r["encoded"] for r in ranks] == [60, 60]  # each image encoded by one process only
    for r in ranks:
        for k in ("train_x", "train_y", "val_x", "val_y"):
            assert torch.equal(r[k], one[k]), k


def test_time_budget_feeds_every_process_the_same_clock(data, tmp_path):
    """torchrun's processes start their run clocks a moment apart; the budget left, which decides whether the
    compile probe (a collective) runs at all, must be rank 0's on every process, or a budget near the 20-minute
    line makes one process probe while the other waits in DDP's first broadcast (a hang under nccl)."""
    folder = tmp_path / "run_s"
    _run(TINY + ["--epochs", "1", "--lr", "0.02", "--data", data, "--out", str(tmp_path / "r"), "--time-budget", "21",
                 "--set", "max_steps_per_epoch=1"], 2, {"CLOCK_LAG": "120", "COMPILE_RUN_S_DIR": str(folder)})
    seen = [(folder / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(seen[0]) == 1 and seen[0] == seen[1], seen
    assert 1200 < float(seen[0][0]) < 21 * 60  # rank 0's: above the compile line that rank 1's own clock is under


def test_lr_find_under_torchrun_is_refused_before_any_work(data, tmp_path):
    """Refused on every process at the start, not after the feature pass (here: the classifier phase on cached
    features) and the speed probes, which took minutes on a real folder."""
    r = _run(TINY + ["--epochs", "1", "--data", data, "--out", str(tmp_path / "r"), "--lr-find", "--freeze", "features",
                     "--pretrained", "none", "--set", "cache_features=true"], 2,
             {"DUMP_FEATURES": str(tmp_path / "features")}, ok=False)
    assert r.returncode != 0
    assert "--lr-find runs in one process; start it with python, not torchrun" in r.stderr, r.stderr[-3000:]
    # the processes' own output is that line (each prints it); the traceback after it is torchrun's launcher's
    line = "error: --lr-find runs in one process; start it with python, not torchrun\n"
    assert r.stderr.startswith(line + line), r.stderr[:300]  # each process's line whole (they once ran together)
    assert "Traceback" not in r.stderr.split("failed (exitcode: 2)")[0], r.stderr[-3000:]
    assert not (tmp_path / "features").exists() and not (tmp_path / "r").exists(), r.stdout
