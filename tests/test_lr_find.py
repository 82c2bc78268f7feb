"""train.py --lr-find (utils/lr_find.py) on real Fashion-MNIST sample images: files, monotonic sweep, suggestion in
range, model state restored, no checkpoint written, an existing run folder untouched byte for byte."""
from __future__ import annotations

import copy
import csv
import hashlib
import os

import pytest
import torch
from export_helpers import make_split  # noqa: E402
from torch import nn

import train  # noqa: E402
from utils import config as C  # noqa: E402
from utils import lr_find  # noqa: E402
from utils.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small from-scratch recipe at 32 px: 120 train images at batch 4 are one 30-step epoch.
TINY = ["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--batch-size", "4", "--workers", "0",
        "--lr", "0.05", "--set", "resize_size=32", "--set", "progress=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split(str(tmp_path_factory.mktemp("lrdata") / "data"))[0]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


def test_exponential_lrs_smoothing_and_suggestion():
    lrs = lr_find.exponential_lrs(1e-6, 1.0, 7)
    assert lrs[0] == 1e-6 and lrs[-1] == pytest.approx(1.0) and lrs[3] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lr_find.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull towards 0
    assert lr_find.smooth([1.0, 3.0], beta=0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])
    lrs = lr_find.exponential_lrs(1e-4, 1.0, 41)  # 10 steps per decade
    loss = [2.0] * 10 + [2.0 - 0.1 * i for i in range(15)] + [0.6 + 0.5 * i for i in range(16)]  # lowest at step 24
    suggestion, at_min = lr_find.suggest_lr(lrs, loss)
    assert at_min == lrs[24] and suggestion == pytest.approx(lrs[24] / 10) == pytest.approx(lrs[14])
    # a lucky first batch is not the minimum (the first steps are skipped), and the suggestion stays in range
    assert lr_find.suggest_lr(lrs, [0.1] + loss[1:]) == (suggestion, at_min)
    # no rate lowered the loss (lowest at the first step that counts): no suggestion, not the bottom of the range
    assert lr_find.suggest_lr(lrs, sorted(loss)) == (None, lrs[10])
    assert lr_find.suggest_lr([1e-6, 1e-3, 1.0], [1.48, 1.6, 2.1]) == (None, 1e-6)  # 3 steps: a small folder
    assert lr_find.suggest_lr([1e-6, 1e-3, 1.0], [1.6, 1.48, 2.1]) == (1e-4, 1e-3)
    with pytest.raises(UserError, match="--lr-find-range"):
        lr_find.exponential_lrs(1.0, 1e-6, 10)


def test_sweep_restores_model_and_optimizer(data):
    from models import build_model
    from utils.data import load_data
    from utils.train_loop import StepContext, Trainable

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=10, width_mult=0.25)
    bundle = load_data(data, img_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=8, workers=0,
                       augment={"scale": (0.5, 1.0), "hflip": 0.5}, cache="memory", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    ctx = StepContext(Trainable(model), opt, nn.CrossEntropyLoss(), torch.device("cpu"), channels_last=False)
    result = lr_find.lr_sweep(ctx, bundle.train_loader, lr_find.exponential_lrs(1e-5, 10.0, 15))
    assert 2 <= len(result.lrs) <= 15 and result.lrs == sorted(result.lrs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert opt.state_dict()["state"] == {} and [g["lr"] for g in opt.param_groups] == [0.1]


def test_lr_find_writes_csv_png_and_no_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train.main(["--data", data, "--out", str(out), *TINY, "--lr-find", "--lr-find-steps", "100"])
    assert sorted(os.listdir(out)) == ["lr_find.csv", "lr_find.png"]  # no config.yaml, log.csv or *.pt
    rows = _read_csv(out / "lr_find.csv")
    lrs = [float(r["lr"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(len(rows))) and 10 <= len(rows) <= 30  # one epoch at most
    assert all(b > a for a, b in zip(lrs, lrs[1:])) and lrs[0] == pytest.approx(1e-6)
    found = summary["lr_find"]
    assert lrs[0] <= found["suggestion"] <= lrs[-1] and found["steps"] == len(rows)
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"suggested lr {found['suggestion']:.3g}: the learning rate at the minimum of the smoothed loss, " \
           "divided by 10" in printed
    assert f"use it with --lr {found['suggestion']:.2g}" in printed  # one phase: its rate is lr
    if found["stopped"]:  # a sweep to lr 1 diverges well before the end
        assert len(rows) < 30 and "stopped early" in printed


def test_lr_find_leaves_an_existing_run_untouched(data, tmp_path):
    out = tmp_path / "run"
    train.main(["--data", data, "--out", str(out), *TINY, "--epochs", "1"])
    before = _digests(out)
    assert {"best.pt", "last.pt", "config.yaml", "log.csv"} <= set(before)
    train.main(["--data", data, "--out", str(out), *TINY, "--lr-find", "--lr-find-steps", "20"])
    after = _digests(out)
    assert set(after) - set(before) == {"lr_find.csv", "lr_find.png"}
    assert {k: after[k] for k in before} == before  # checkpoints, config and log byte for byte


def test_lr_find_on_cached_features_of_finetune_recipe(data, tmp_path, capsys):
    out = tmp_path / "ft"
    summary = train.main(["--config", os.path.join(ROOT, "configs", "finetune.yaml"), "--data", data, "--out",
                          str(out), "--img-size", "64", "--batch-size", "8", "--workers", "0", "--set", "progress=false",
                          "--lr-find", "--lr-find-range", "1e-4", "10"])
    rows = _read_csv(out / "lr_find.csv")
    assert len(rows) == summary["lr_find"]["steps"] <= 15  # 120 images / batch 8
    assert float(rows[0]["lr"]) == pytest.approx(1e-4)
    assert sorted(os.listdir(out)) == ["lr_find.csv", "lr_find.png"]
    # the sweep ran on the classifier phase, whose rate is head_lr (--lr would set the whole-network phase)
    printed = capsys.readouterr().out
    value = f"{float(format(summary['lr_find']['suggestion'], '.2g')):.1e}"  # 3.0e-05: a float to --set's YAML
    assert f"use it with --set head_lr={value} at --batch-size 8, the batch it was found at" in printed
    assert "--lr " not in printed.split("use it with")[1]
    assert C.build_config({}, "r", {}, [f"head_lr={value}"]).head_lr == pytest.approx(float(value))


def test_sweep_repeats_a_learning_rate_when_gradscaler_skipped_the_step(data):
    """fp16 with GradScaler: a step whose gradients overflowed changes no weight (the scaler skips it and halves its
    scale), so its loss must not be recorded against that lr. A real GradScaler at a loss scale of 2**127 overflows
    on the first step (the scaled loss itself is inf in fp32), and again until halving brings the gradients in range."""
    from models import build_model
    from utils.data import load_data
    from utils.train_loop import StepContext, Trainable

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=10, width_mult=0.25)
    bundle = load_data(data, img_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=8, workers=0,
                       augment={"scale": (0.5, 1.0), "hflip": 0.5}, cache="memory", seed=0)
    batches = []

    def counted():
        for b in bundle.train_loader:
            batches.append(len(b[1]))
            yield b

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    ctx = StepContext(Trainable(model), torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                      torch.device("cpu"), channels_last=False, scaler=scaler)
    lrs = lr_find.exponential_lrs(1e-5, 1e-3, 6)  # low rates: the sweep runs all its steps
    result = lr_find.lr_sweep(ctx, counted(), lrs)
    assert result.lrs == lrs and result.stopped is None
    skipped = len(batches) - len(lrs)
    assert 1 <= skipped <= lr_find.MAX_SCALER_SKIPS, batches  # overflowing steps took batches, recorded nothing
    assert scaler.get_scale() == 2.0 ** 127  # the scaler's state is put back too


def test_lr_find_without_a_falling_loss_suggests_nothing(tmp_path, capsys, monkeypatch):
    """A 3-step sweep (a small folder at batch 64) whose loss is lowest at its first step once suggested 1e-06,
    the bottom of the range and 10,000x below the recipe's rate, as 'use it with'. Now it says there is none."""
    lrs = lr_find.exponential_lrs(1e-6, 1.0, 3)
    smoothed = [1.48, 1.55, 2.9]
    suggestion, at_min = lr_find.suggest_lr(lrs, smoothed)
    result = lr_find.LRFindResult(lrs, smoothed, smoothed, suggestion, at_min, None, 3)
    monkeypatch.setattr(lr_find, "lr_sweep", lambda *a, **k: result)

    class Data:
        train_loader = None

        def set_epoch(self, epoch):
            pass

    summary = lr_find.run_lr_find(None, Data(), str(tmp_path), steps=3, flag="--set head_lr=")
    printed = capsys.readouterr().out
    assert summary["lr_find"]["suggestion"] is None
    assert ("no suggested lr: the smoothed loss never fell below its value at lr 1e-06, the first step that counts, "
            "so this 3-step sweep found no rate that trains better; keep the recipe's rate") in printed
    assert "use it with" not in printed and "suggested lr 1e-06" not in printed
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "lr_find.csv").exists()
