"""utils/pruning.py: real structured pruning (fewer channels, fewer MACs), save/load, fine-tune CLI, export."""
from __future__ import annotations

import json
import os

import pytest
import torch
from export_helpers import make_run  # noqa: E402
from torch import nn

import export  # noqa: E402
import prune  # noqa: E402
from models import build_model, count_macs, count_params  # noqa: E402
from utils import pruning  # noqa: E402
from utils.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from utils.errors import UserError  # noqa: E402


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_prune_removes_expanded_channels(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, width_mult=0.5).eval()
    x = torch.rand(2, 3, 64, 64)
    hidden_before = [c.out_channels for c in pruning.expansion_convs(model)]
    macs, params = count_macs(model, 64), count_params(model)
    pruning.prune_expanded_channels(model, 0.5, img_size=64)
    hidden_after = [c.out_channels for c in pruning.expansion_convs(model)]
    assert len(hidden_after) == len(hidden_before) > 5
    assert all(a < b for a, b in zip(hidden_after, hidden_before))
    assert all(a % 8 == 0 for a in hidden_after)  # fast-kernel friendly
    for m in model.modules():  # depthwise convs shrank with their inputs
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels
    assert count_macs(model, 64) < 0.8 * macs and count_params(model) < params
    assert model(x).shape == (2, 10)


def test_pruned_state_dict_loads_through_model_from_checkpoint():
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=5, width_mult=0.35).eval()
    pruning.prune_expanded_channels(model, 0.4, img_size=32)
    ckpt = {"model": model.state_dict(), "ema": None, "arch": model.arch, "pruned": {"ratio": 0.4}}
    with pytest.raises(RuntimeError):  # a full-width model cannot take these weights...
        build_model(**model.arch).load_state_dict(ckpt["model"])
    loaded = model_from_checkpoint(ckpt)  # ...the "pruned" entry makes the loader resize the layers
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_prune_cli_fine_tunes_reports_and_exports(tmp_path, capsys):
    ckpt = make_run(str(tmp_path))
    out = str(tmp_path / "pruned")
    report = prune.main([ckpt, "--ratio", "0.5", "--steps", "4", "--lr", "0.001", "--batch-size", "16", "--workers", "0",
                         "--repeats", "3", "--out", out, "--no-progress"])
    assert "epoch 1" not in capsys.readouterr().err  # --no-progress: no fine-tune bar
    b, a = report["before"], report["after_fine_tune"]
    assert a["macs"] < 0.8 * b["macs"] and a["params"] < b["params"]
    assert report["fine_tune"]["steps"] == 4 and report["val_images"] == 80
    # the saved weights are the better of "BatchNorm re-estimated" and "fine-tuned"
    assert a["val_top1"] == max(report["fine_tune"]["val_top1"], report["after_prune"]["val_top1_bn_recalibrated"])
    for k in ("val_top1", "eager_ms", "onnxruntime_ms"):
        assert k in a and k in b
    assert report["after_prune"]["bn_images"] == 120  # all 120 training images (fewer than --bn-images)
    assert json.load(open(os.path.join(out, "prune.json")))["after_fine_tune"]["macs"] == a["macs"]
    saved = load_checkpoint(os.path.join(out, "pruned.pt"))
    assert saved["pruned"]["ratio"] == 0.5 and saved["classes"] == load_checkpoint(ckpt)["classes"]
    exp = export.main([os.path.join(out, "pruned.pt"), "--format", "onnx", "--out", str(tmp_path / "exp")])
    assert exp["pruned"] and exp["checks"]["onnx"]["passed"]
    with pytest.raises(UserError, match="already pruned"):
        prune.main([os.path.join(out, "pruned.pt"), "--out", str(tmp_path / "again")])


def test_fine_tune_is_reproducible_and_trains(tmp_path):
    from utils.config import from_checkpoint

    ckpt = load_checkpoint(make_run(str(tmp_path)))
    cfg = from_checkpoint(ckpt["config"], "ckpt")
    runs = []
    for _ in range(2):
        model = model_from_checkpoint(ckpt)
        pruning.prune_expanded_channels(model, 0.5, int(ckpt["preprocess"]["img_size"]))
        model.classifier[0].p = 0.2  # the helper's run has no dropout; the recipes have 0.2
        before = {k: v.clone() for k, v in model.state_dict().items()}
        pruning.fine_tune(model, cfg.data, cfg, ckpt["preprocess"], steps=6, lr=0.01, batch_size=16,
                        device=torch.device("cpu"), workers=0)
        runs.append(model.state_dict())
    assert any(not torch.equal(before[k], runs[0][k]) for k in before)  # it trained
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # same data order, augmentation, dropout


def test_bad_ratio_and_steps_are_user_errors(tmp_path):
    for ratio in (1.5, 0.0):
        with pytest.raises(UserError) as e:
            pruning.prune_expanded_channels(build_model("mobilenet_v2", num_classes=2, width_mult=0.25), ratio, 32)
        assert str(e.value) == ("--ratio must be above 0 and below 1 (fraction of expanded channels removed), got "
                                f"{ratio}")
    with pytest.raises(UserError) as e:  # before the checkpoint is even opened
        prune.main([str(tmp_path / "best.pt"), "--steps", "-1"])
    assert str(e.value) == "--steps must be 0 (no fine-tuning) or more, got -1"
