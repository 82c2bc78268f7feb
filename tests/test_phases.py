"""Head-then-full fine-tuning (``head_epochs``) and ``--time-budget`` on real Fashion-MNIST sample images: the
backbone stays untouched while the head trains, everything trains after, resume is exact across and inside the
phases, and the budget fits the epochs from the first whole-network epoch."""
import os
import time

import pytest
import torch
import yaml
from eval_helpers import link_sample_split
from test_train import TINY, _max_diff, _rows, run_killed_then_resumed
from train_helpers import train_interrupted_at

import train
from utils.checkpoint import load_checkpoint

PHASED = TINY + ["--epochs", "3", "--lr", "0.02", "--pretrained", "none", "--set", "head_epochs=1",
                 "--set", "head_lr=0.05", "--set", "cache_features=true", "--set", "warmup_epochs=1",
                 "--set", "backbone_lr_mult=0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return link_sample_split(str(tmp_path_factory.mktemp("fmnist")), 12, 4, None)


def _backbone(state):
    return {k: v for k, v in state.items() if k.startswith("features.")}


def test_head_epochs_train_the_classifier_then_the_whole_network(data, tmp_path, monkeypatch):
    saved = {}
    real_save = train.save_checkpoint

    def keep(path, state):  # every checkpoint as written, by epoch
        saved[(os.path.basename(path), state["epoch"])] = {k: v.clone() for k, v in state["model"].items()}
        saved[("phase", state["epoch"])] = state["phase"]
        real_save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", keep)
    train.main(PHASED + ["--data", data, "--out", str(tmp_path / "run"), "--set", "max_steps_per_epoch=3"])
    cfg = train.resolve_config(train.get_args_parser().parse_args(PHASED + ["--data", data]))[0]
    init = train.make_model(cfg, 10, resuming=False, is_main=False).state_dict()
    after_head, final = saved[("last.pt", 1)], saved[("last.pt", 3)]
    assert _max_diff(_backbone(init), _backbone(after_head)) == 0  # head phase: backbone untouched
    assert not torch.equal(init["classifier.1.weight"], after_head["classifier.1.weight"])
    assert _max_diff(_backbone(after_head), _backbone(final)) > 0  # full phase: the backbone learns
    assert [saved[("phase", e)] for e in (1, 2, 3)] == ["head", "full", "full"]
    rows = _rows(str(tmp_path / "run" / "log.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    # head epoch at head_lr (cosine over 1 epoch ends near 0); full phase re-warmed: epoch 2 ends its 1-epoch warmup
    assert float(rows[1]["lr"]) == pytest.approx(0.02)
    with open(tmp_path / "run" / "config.yaml") as f:
        rec = yaml.safe_load(f)
    assert rec["phases"] == [{"name": "head", "epochs": [1, 1], "lr": 0.05}, {"name": "full", "epochs": [2, 3], "lr": 0.02}]
    assert rec["speed"]["compile"]["value"] is False


def test_mixup_and_cutmix_mix_the_images_of_the_whole_network_phase_only(data, tmp_path, monkeypatch):
    # the classifier phase trains on cached pooled features: CutMix on those (N, C) vectors raised ValueError
    mixed = []
    real_build = train.build_mixup

    def recording_build(mixup_alpha, cutmix_alpha, num_classes):
        op = real_build(mixup_alpha, cutmix_alpha, num_classes)

        def mix(images, targets):
            mixed.append(tuple(images.shape))
            return op(images, targets)
        return mix

    monkeypatch.setattr(train, "build_mixup", recording_build)
    train.main(PHASED + ["--data", data, "--out", str(tmp_path / "run"), "--set", "max_steps_per_epoch=2",
                         "--set", "mixup_alpha=0.2", "--set", "cutmix_alpha=1.0"])
    assert len(_rows(str(tmp_path / "run" / "log.csv"))) == 3
    assert len(mixed) == 4 and all(len(shape) == 4 for shape in mixed)  # 2 whole-network epochs x 2 image batches


@pytest.mark.parametrize("cut_after", [1, 2])
def test_resume_across_and_inside_the_phases_is_exact(data, tmp_path, monkeypatch, cut_after):
    args = PHASED + ["--data", data]
    train.main(args + ["--out", str(tmp_path / "full")])
    run_killed_then_resumed(args, tmp_path / "cut", monkeypatch, cut_after)
    a, b = load_checkpoint(str(tmp_path / "full" / "last.pt")), load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert _max_diff(a["model"], b["model"]) == 0
    assert a["step"] == b["step"] and a["scheduler"] == b["scheduler"]
    assert _rows(str(tmp_path / "full" / "log.csv")) == _rows(str(tmp_path / "cut" / "log.csv"))


def _fake_run(minutes_spent, budget):
    cfg = train.cfglib.TrainConfig(time_budget=budget, epochs=5)
    run = train.Run(cfg, "out", "data", False, [], time.perf_counter() - 60 * minutes_spent)
    return run


def test_time_budget_fits_the_epochs_from_the_first_epoch():
    phase = train.Phase("full", train.cfglib.TrainConfig(), 2, 5)  # 2 head epochs, then 3 whole-network epochs
    # 30-minute budget, 5.9 minutes spent, an epoch takes 2 minutes: 12 more epochs after this one
    run = _fake_run(5.9, 30)
    assert train.fit_to_budget(run, phase, 2, 120.0) == 2 + 1 + 12
    assert run.budget_fit["epochs"] == 15 and run.budget_fit["epoch_seconds"] == 120.0
    # over budget already: the phase ends after this epoch
    assert train.fit_to_budget(_fake_run(31.0, 30), phase, 2, 120.0) == 3
    # a huge budget stretches the phase to at most 10x its recipe length
    assert train.fit_to_budget(_fake_run(0.0, 10_000), phase, 2, 1.0) == 2 + 10 * 3


def test_time_budget_refits_from_the_epochs_after_a_slow_first_one():
    # 30-minute budget; the whole-network phase (epochs 31-40) starts after 3 minutes; its first epoch takes 138 s
    phase = train.Phase("full", train.cfglib.TrainConfig(), 30, 40)
    run = _fake_run(3 + 138 / 60, 30)
    assert train.refits_budget(run, phase, 30)
    phase.end = train.fit_to_budget(run, phase, 30, 138.0)
    assert phase.end == 31 + 10  # 1482 s left / 138 s
    run.t0 -= 80  # the second epoch takes 80 s: 1402 s left / 80 s = 17 more
    phase.end = train.fit_to_budget(run, phase, 31, 80.0)
    assert phase.end == 32 + 17
    assert run.budget_fit["epoch_seconds"] == 80.0 and run.budget_fit["epoch_seconds_seen"] == [138.0, 80.0]
    run.t0 -= 90  # the third takes 90 s: the median of 80 and 90 is 85; 1312 s left / 85 s = 15 more
    phase.end = train.fit_to_budget(run, phase, 32, 90.0)
    assert phase.end == 33 + 15
    # fits go on through the first half of the phase (epochs 31-39 of 31-48), then only trims_budget may move its end (earlier)
    assert train.refits_budget(run, phase, 38) and not train.refits_budget(run, phase, 39)
    assert not train.trims_budget(run, phase, 38) and train.trims_budget(run, phase, 39)
    # a checkpoint written before re-fitting existed keeps its one fit; no budget, no fit
    legacy = _fake_run(3 + 138 / 60, 30)
    legacy.budget_fit = {"epochs": 41, "epoch_seconds": 138.0, "minutes_spent": 5.3, "budget_minutes": 30}
    assert not train.refits_budget(legacy, phase, 31)
    assert not train.refits_budget(_fake_run(0.0, 0), phase, 30)


def test_time_budget_refits_keep_the_cap_of_the_recipe_epochs():
    # epochs of 0.1 s (a classifier on cached features): every fit hits the cap, 10x the recipe's 3 epochs, not 10x
    # the previous fit's
    phase = train.Phase("full", train.cfglib.TrainConfig(), 2, 5)
    run = _fake_run(0.0, 10_000)
    ends = []
    for epoch in range(2, 5):
        ends.append(train.fit_to_budget(run, phase, epoch, 0.1))
        phase.end = ends[-1]
    assert ends == [2 + 10 * 3] * 3 and run.budget_fit["cap"] == 32


def _simulate_budget(epoch_seconds, trims: bool, minutes_before=2.0, budget=30):
    """Run --time-budget's fitting over a whole-network phase (epochs 31-40 of the recipe) whose epoch ``i`` takes
    ``epoch_seconds(i)``; returns (minutes at the phase's end, its last epoch, the fit lines printed)."""
    phase = train.Phase("full", train.cfglib.TrainConfig(), 30, 40)
    run = _fake_run(minutes_before, budget)
    epoch = 30
    while epoch < phase.end:
        run.t0 -= epoch_seconds(epoch)  # the epoch's time passes
        if train.refits_budget(run, phase, epoch) or (trims and train.trims_budget(run, phase, epoch)):
            phase.end = train.fit_to_budget(run, phase, epoch, epoch_seconds(epoch),
                                            trim_only=not train.refits_budget(run, phase, epoch))
        epoch += 1
    return run.elapsed() / 60, phase.end


def test_time_budget_trims_the_second_half_when_epochs_turn_slower_and_never_lengthens_it():
    # the tops_readme run of docs/finetune.md: epochs of 56 s planned, then 66 s from the second half on (a busy
    # host); fitting only in the first half ran the 30-minute budget to 31.3 minutes
    slower = lambda e: 56.0 if e < 46 else 66.0  # noqa: E731
    over, _ = _simulate_budget(slower, trims=False)
    assert over > 31.0  # what the old rule did
    minutes, end = _simulate_budget(slower, trims=True)
    assert 29.0 <= minutes <= 30.0 and end < 30 + 31
    # epochs that turn faster never move the end later (the cosine tail stays where it was planned)
    steady, steady_end = _simulate_budget(lambda e: 56.0, trims=True)
    faster, faster_end = _simulate_budget(lambda e: 56.0 if e < 46 else 40.0, trims=True)
    assert faster_end == steady_end and faster < steady <= 30.0
    # one slow epoch (+64 s) costs one epoch and no more: the median of the last 5 is not moved by it
    blip, blip_end = _simulate_budget(lambda e: 120.0 if e == 50 else 56.0, trims=True)
    assert blip_end == steady_end - 1 and blip <= 30.0


def test_time_budget_keeps_the_finish_free():
    # the calibration after the last epoch is one more pass over val: a fit leaves its time free
    phase = train.Phase("full", train.cfglib.TrainConfig(), 2, 5)
    assert train.fit_to_budget(_fake_run(5.9, 30), phase, 2, 120.0) == 2 + 1 + 12  # 1446 s // 120
    assert train.fit_to_budget(_fake_run(5.9, 30), phase, 2, 120.0, finish_s=10.0) == 2 + 1 + 11  # 1436 s // 120


def test_time_budget_run_stops_on_time_and_resume_keeps_the_fit(data, tmp_path, capsys):
    out = tmp_path / "run"
    # 0.0005 minutes (30 ms) are spent before the first whole-network epoch ends: that epoch is the last
    train.main(PHASED + ["--epochs", "4", "--data", data, "--out", str(out), "--time-budget", "0.0005"])
    assert "time budget 0.0005 min:" in capsys.readouterr().out
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["epoch"] == 2 and ckpt["time_budget_fit"]["epochs"] == 2 and ckpt["config"]["epochs"] == 2
    assert [r["epoch"] for r in _rows(str(out / "log.csv"))] == ["1", "2"]
    with open(out / "config.yaml") as f:
        assert yaml.safe_load(f)["time_budget_fit"]["epochs"] == 2


def test_freeze_bn_keeps_pretrained_statistics_while_the_weights_train():
    from torch import nn

    from models import build_model
    from utils.train_loop import StepContext, Trainable, train_step

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=3, width_mult=0.25, dropout=0.0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = Trainable(model, freeze_bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(trainable, opt, nn.CrossEntropyLoss(), torch.device("cpu"), None, None)
    trainable.train()  # what train_one_epoch calls first
    train_step(ctx, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert all(not m.training for m in bns) and model.classifier.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k or "num_batches" in k)
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    bn_weight = dict(model.named_parameters())["features.0.1.weight"]
    assert bn_weight.grad is not None and bn_weight.grad.abs().sum() > 0  # BN affine parameters still train


def test_phase_text_says_epoch_for_one_and_epochs_for_more():
    """The run header and each phase's first line count epochs in words a user reads ("1 whole-network epoch")."""
    assert train.phase_text("full", 1) == "whole-network epoch"
    assert train.phase_text("full", 12) == "whole-network epochs"
    assert train.phase_text("head", 1) == "classifier-only epoch (backbone frozen)"
    assert train.phase_text("head", 30) == "classifier-only epochs (backbone frozen)"


def test_time_budget_line_counts_in_words_and_shows_short_epochs_in_tenths(capsys):
    """A tiny folder's epochs take under a second: the fit line says "0.6 s", not "1 s", and "1 more epoch"."""
    phase = train.Phase("full", train.cfglib.TrainConfig(), 2, 5)
    run = _fake_run(0.985, 1)  # 0.9 s left
    run.main_proc = True
    assert train.fit_to_budget(run, phase, 2, 0.6) == 2 + 1 + 1  # 0.9 s left // 0.6 s
    line = capsys.readouterr().out
    assert "an epoch takes 0.6 s -> 1 more epoch, 4 in all" in line, line
    assert train.seconds_text(48.4) == "48 s" and train.seconds_text(9.94) == "9.9 s"


def test_ctrl_c_in_the_feature_pass_stops_within_a_batch(data, tmp_path, monkeypatch, capsys):
    """Ctrl-C once used to be noticed only at the first training step, after the whole feature pass (35 s on 6,000
    images at 224 px, and it grows with the folder), whose features a resume computes again anyway."""
    out = tmp_path / "run"
    args = PHASED + ["--data", data, "--out", str(out), "--batch-size", "8"]  # 120 train images: 15 batches
    # SIGINT while the second batch of the feature pass is collated (workers=0: in the main process)
    calls = train_interrupted_at(monkeypatch, args, "collate_readable", 1)
    assert calls == 2  # stopped after the batch that was running, not at the end of the pass
    assert ("interrupted in the feature pass, before any step of this phase: nothing trained, nothing saved; run "
            "the same command again to start") in capsys.readouterr().err
    assert not (out / "last.pt").exists()
    train.main(args + ["--set", "max_steps_per_epoch=2"])  # the same command starts (the folder holds no run to protect)
    assert (out / "last.pt").is_file()
