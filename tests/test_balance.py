"""Imbalanced classes (utils/balance.py) on real Fashion-MNIST sample images: the imbalance rule and the auto
decisions, the class-weighted loss against its formula, the class-balanced sampler (even classes, a pure function
of (seed, epoch), disjoint shards across ranks, memory / disk / cached-feature paths), exact resume with it, and
what train.py and split_dataset.py print and record."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from eval_helpers import link_sample_split
from torch import nn
from train_helpers import train_cut_at_step

import train
from utils import balance as B
from utils import imbalance as imbal
from utils.checkpoint import load_checkpoint
from utils.config import build_config
from utils.data import IMAGENET_MEAN, IMAGENET_STD, load_data
from utils.errors import UserError
from utils.train_loop import FeatureBatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
CLASSES = ["Bag", "Sandal", "Trouser"]
COUNTS = {"Bag": 16, "Sandal": 8, "Trouser": 4}  # ratio 4: imbalanced
TINY = ["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--set", "resize_size=32", "--set", "progress=false", "--set", "amp=off"]


def imbalanced_split(root, counts=COUNTS, n_val=4):
    """``root/{train,val}/<class>/`` of symlinks to the real sample PNGs: ``counts[c]`` train, ``n_val`` val."""
    return link_sample_split(str(root), dict(counts), n_val)


@pytest.fixture(scope="module")
def imb(tmp_path_factory):
    return imbalanced_split(tmp_path_factory.mktemp("imb"))


def _load(data_dir, cache, **kw):
    args = dict(img_size=32, resize_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=4, workers=0,
                augment={}, cache=cache, seed=3, progress=False)
    args.update(kw)
    return load_data(data_dir, **args)


def _balanced_bundle(data_dir, cache, **kw):
    b = _load(data_dir, cache, **kw)
    B.use_balanced_sampler(b.train_loader, B.train_labels(b.train_loader), len(b.classes))
    return b


def _labels(bundle, epoch):
    bundle.set_epoch(epoch)
    return torch.cat([y for _, y in bundle.train_loader])


# ------------------------------------------------------------------------------------ rule and decisions
def test_draw_prior_is_the_class_share_of_an_epoch_draw():
    assert B.draw_prior([80, 20], "none").tolist() == pytest.approx([0.8, 0.2])
    assert B.draw_prior([100, 25, 0], "sqrt").tolist() == pytest.approx([10 / 15, 5 / 15, 0.0])
    for mode in ("sampler", "loss"):
        assert B.draw_prior([90, 10, 0], mode).tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_logit_adjusted_loss_learns_no_preference_for_the_large_class():
    """A bias-only model fitted to 90/10 labels: plain cross-entropy learns log(0.9/0.1) between the classes (the
    prior), the logit-adjusted loss with tau=1 learns none, and tau=0.5 half of it."""
    target = torch.tensor([0] * 90 + [1] * 10)
    prior = B.draw_prior([90, 10], "none")

    def fitted_gap(criterion):
        bias = torch.zeros(2, requires_grad=True)
        opt = torch.optim.LBFGS([bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = criterion(bias.expand(len(target), 2), target)
            loss.backward()
            return loss

        opt.step(closure)
        return float((bias[0] - bias[1]).detach())

    ce = nn.CrossEntropyLoss()
    assert fitted_gap(ce) == pytest.approx(torch.log(torch.tensor(9.0)).item(), abs=1e-3)
    assert fitted_gap(B.LogitAdjusted(ce, prior, 1.0)) == pytest.approx(0.0, abs=1e-3)
    assert fitted_gap(B.LogitAdjusted(ce, prior, 0.5)) == pytest.approx(0.5 * torch.log(torch.tensor(9.0)).item(),
                                                                        abs=1e-3)
    logits = torch.randn(5, 2)
    y = torch.tensor([0, 1, 1, 0, 1])
    assert float(B.LogitAdjusted(ce, prior, 1.0)(logits, y)) == pytest.approx(float(ce(logits + prior.log(), y)))



def test_imbalance_rule_and_auto_decisions():
    assert imbal.imbalance([16, 8, 4]) == (0, 2, 4.0)
    assert not imbal.is_imbalanced([10, 10, 7]) and imbal.is_imbalanced([15, 10, 10])  # 1.43 < 1.5 <= 1.5
    assert imbal.decide_class_balance("auto", [10, 10, 10]).value == "none"
    assert imbal.decide_class_balance("auto", [16, 8, 4]).value == imbal.AUTO_IMBALANCED
    assert imbal.decide_class_balance("sampler", [10, 10, 10]) == imbal.Decision("sampler", "set in the config")
    assert imbal.decide_select_metric("auto", [16, 8, 4]).value == "balanced_acc"
    assert imbal.decide_select_metric("auto", [10, 10, 9]).value == "top1"
    assert imbal.decide_select_metric("top1", [16, 8, 4]).value == "top1"
    with pytest.raises(UserError, match="class_balance' must be one of auto, none, loss, sampler, sqrt"):
        build_config(None, "x", {}, ["class_balance=focal"])
    with pytest.raises(UserError, match="select_metric' must be one of auto, top1, balanced_acc"):
        build_config(None, "x", {}, ["select_metric=f1"])


# ------------------------------------------------------------------------------------ weighted loss
def test_class_weights_are_inverse_frequency_with_mean_one():
    w = B.class_weights([16, 8, 4])
    assert w.tolist() == pytest.approx([1 / 16 / (7 / 48), 1 / 8 / (7 / 48), 1 / 4 / (7 / 48)])
    assert float(w.mean()) == pytest.approx(1.0)
    assert B.class_weights([5, 0, 5]).tolist() == [1.0, 0.0, 1.0]  # an empty class is never a target


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_weighted_loss_equals_the_formula(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=g) * 3
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    w = B.class_weights([16, 8, 4])
    got = B.WeightedCrossEntropy(w, eps)(logits, target)
    # by hand: sum_i w[y_i] * (-(1-eps) log p_i[y_i] - eps/C sum_c log p_i[c]) / sum_i w[y_i]
    num = den = 0.0
    for i in range(7):
        logp = [float(v) for v in torch.log_softmax(logits[i].double(), 0)]
        ce = -(1 - eps) * logp[int(target[i])] - eps / 3 * sum(logp)
        num += float(w[target[i]]) * ce
        den += float(w[target[i]])
    assert float(got) == pytest.approx(num / den, rel=1e-6)
    if eps == 0:
        assert float(got) == pytest.approx(float(nn.CrossEntropyLoss(weight=w)(logits, target)), rel=1e-6)
    # soft (MixUp) targets: a one-hot soft target gives the same loss; a mixed one takes the mixed weight
    onehot = torch.nn.functional.one_hot(target, 3).float()
    assert float(B.WeightedCrossEntropy(w, eps)(logits, onehot)) == pytest.approx(float(got), rel=1e-6)
    unweighted = B.WeightedCrossEntropy(torch.ones(3), eps)(logits, target)
    assert float(unweighted) == pytest.approx(float(nn.CrossEntropyLoss(label_smoothing=eps)(logits, target)),
                                              rel=1e-6)


# ------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_sampler_draws_classes_evenly_and_is_a_function_of_seed_and_epoch(imb, cache):
    b = _balanced_bundle(imb, cache)
    assert b.cache == cache and b.num_train == 28
    assert len(b.train_loader) == 7  # epoch length = dataset size (28 images / batch 4)
    epochs = [_labels(b, e) for e in range(30)]
    assert all(len(y) == 28 for y in epochs)
    counts = torch.bincount(torch.cat(epochs), minlength=3).tolist()  # 840 draws, 280 expected per class
    assert all(230 <= n <= 330 for n in counts), counts
    plain = torch.bincount(torch.cat([_labels(_load(imb, cache), e) for e in range(3)]), minlength=3).tolist()
    assert plain == [48, 24, 12]  # without it: every image once per epoch, 16:8:4
    again = _balanced_bundle(imb, cache)  # a new process (resume) gets the same draw for the same epoch
    assert torch.equal(_labels(again, 7), epochs[7]) and torch.equal(_labels(b, 7), epochs[7])
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:4])
    other_seed = _balanced_bundle(imb, cache, seed=4)
    assert not torch.equal(_labels(other_seed, 7), epochs[7])


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_sampler_shards_the_same_draw_disjointly_across_two_ranks(imb, cache, monkeypatch):
    one = _balanced_bundle(imb, cache, batch_size=8)
    one.set_epoch(5)
    one_idx = [[i for i, _ in batch] for batch in one.train_loader.batch_sampler]
    one_y = [y for _, y in one.train_loader]
    ranks = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        b = _balanced_bundle(imb, cache, batch_size=4, distributed=True)
        b.set_epoch(5)
        ranks.append(([[i for i, _ in batch] for batch in b.train_loader.batch_sampler],
                      [y for _, y in b.train_loader]))
    (idx0, y0), (idx1, y1) = ranks
    assert len(idx0) == len(idx1) == len(one_idx)
    for g, r0, r1 in zip(one_idx, idx0, idx1):
        assert g[0::2] == r0 and g[1::2] == r1  # rank r: positions r, r+2, ... of the global draw: disjoint
    for y, a, c in zip(one_y, y0, y1):
        assert torch.equal(y[0::2], a) and torch.equal(y[1::2], c)


def test_feature_batches_balanced_draw_and_shards():
    labels = torch.tensor([0] * 16 + [1] * 8 + [2] * 4)
    feats = torch.arange(28, dtype=torch.float32)[:, None]  # feature = image index
    fb = FeatureBatches(feats, labels, 4, shuffle=True, seed=3)
    B.use_balanced_sampler(fb, B.train_labels(fb), 3)
    drawn = []
    for e in range(30):
        fb.set_epoch(e)
        drawn.append(torch.cat([y for _, y in fb]))
    assert all(len(y) == 28 for y in drawn)
    counts = torch.bincount(torch.cat(drawn), minlength=3).tolist()
    assert all(230 <= n <= 330 for n in counts), counts
    fb.set_epoch(2)
    whole = torch.cat([x for x, _ in fb]).flatten()
    parts = []
    for rank in (0, 1):
        r = FeatureBatches(feats, labels, 4, shuffle=True, seed=3, rank=rank, world_size=2)
        B.use_balanced_sampler(r, labels, 3)
        r.set_epoch(2)
        parts.append(torch.cat([x for x, _ in r]).flatten())
    assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])


def test_sqrt_draw_follows_square_root_of_counts():
    """class_balance=sqrt: class totals in proportion to sqrt(count) (16:8:4 -> 4:2.83:2), between the natural
    16:8:4 and the even draw."""
    labels = torch.tensor([0] * 16 + [1] * 8 + [2] * 4)
    w = B.sample_weights(labels, 3, B.SAMPLER_POWER["sqrt"])
    totals = torch.stack([w[labels == c].sum() for c in range(3)])
    assert torch.allclose(totals / totals.sum(), torch.tensor([4.0, 8 ** 0.5, 2.0], dtype=torch.float64) / (6 + 8 ** 0.5))
    fb = FeatureBatches(torch.zeros(28, 1), labels, 4, shuffle=True, seed=3)
    B.use_balanced_sampler(fb, labels, 3, "sqrt")
    drawn = []
    for e in range(200):
        fb.set_epoch(e)
        drawn.append(torch.cat([y for _, y in fb]))
    share = torch.bincount(torch.cat(drawn), minlength=3).double() / (200 * 28)
    assert torch.allclose(share, totals / totals.sum(), atol=0.02), share


# ------------------------------------------------------------------------------------ train.py
def _full_then_cut(args, tmp_path, monkeypatch):
    """``train.main(args)`` into tmp_path/full uncut, then into tmp_path/cut stopped by a real Ctrl-C during the 2nd
    step of epoch 2 (4 steps per epoch: 28 images / batch 8, last batch 4): it stops after that step."""
    train.main(args + ["--out", str(tmp_path / "full")])
    train_cut_at_step(monkeypatch, args + ["--out", str(tmp_path / "cut")], 5)


def test_resume_with_sampler_is_exact(imb, tmp_path, monkeypatch):
    args = TINY + ["--epochs", "2", "--lr", "0.05", "--set", "class_balance=sampler", "--set", "label_smoothing=0.1",
                   "--set", "select_se=1", "--data", imb]
    _full_then_cut(args, tmp_path, monkeypatch)
    assert load_checkpoint(str(tmp_path / "cut" / "last.pt"))["partial_epoch"]["batches_done"] == 2
    train.main(["--resume", str(tmp_path / "cut" / "last.pt")])
    a, b = load_checkpoint(str(tmp_path / "full" / "last.pt")), load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["class_balance_used"]["class_balance"] == "sampler"
    # the best-epoch rule carries over: the best so far, its standard error and the epoch in best.pt
    assert (a["best_acc"], a["best_se"], a["best_kept"]) == (b["best_acc"], b["best_se"], b["best_kept"])
    assert a["best_se"] > 0 and a["best_kept"]["epoch"] in (1, 2)

    def rows(run):
        with open(tmp_path / run / "log.csv") as f:
            return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_s")}
                    for r in csv.DictReader(f)]

    assert rows("full") == rows("cut")


def test_resume_keeps_what_auto_meant_when_the_run_started(imb, tmp_path, monkeypatch):
    """A run started while auto meant the even sampler continues with it after the default changed (sqrt), so it
    ends bit for bit as if it had never stopped."""
    args = TINY + ["--epochs", "2", "--lr", "0.05", "--set", "label_smoothing=0.1", "--data", imb]
    monkeypatch.setattr(imbal, "AUTO_IMBALANCED", "sampler")  # the default before
    _full_then_cut(args, tmp_path, monkeypatch)
    monkeypatch.setattr(imbal, "AUTO_IMBALANCED", "sqrt")  # the default now
    train.main(["--resume", str(tmp_path / "cut" / "last.pt")])
    a, b = load_checkpoint(str(tmp_path / "full" / "last.pt")), load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert a["class_balance_used"]["class_balance"] == b["class_balance_used"]["class_balance"] == "sampler"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_auto_on_imbalanced_folder_prints_records_and_logs(imb, tmp_path, capsys):
    out = tmp_path / "run"
    res = train.main(TINY + ["--epochs", "2", "--lr", "0.05", "--data", imb, "--out", str(out)])
    text = capsys.readouterr().out
    assert "class balance of train: largest Bag 16, smallest Trouser 4: ratio 4.0 (>= 1.5: imbalanced)" in text
    assert f"class_balance {imbal.AUTO_IMBALANCED} (auto: imbalanced training folder;" in text
    assert "select_metric balanced_acc: best.pt = best val balanced accuracy (auto:" in text
    assert "bal-acc " in text and "macro-F1 " in text
    assert "done: best val balanced accuracy" in text
    # resuming the finished run trains nothing, and still names what best_acc measures
    train.main(["--resume", str(out / "last.pt")])
    again = capsys.readouterr().out
    assert f"done: best val balanced accuracy {res['best_acc']:.2f}%" in again and "val top-1" not in again
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[5:9] == ["val_top1", "val_top5", "val_bal_acc", "val_macro_f1"]
    for r in rows:
        assert 0 <= float(r["val_bal_acc"]) <= 100 and 0 <= float(r["val_macro_f1"]) <= 1
    import yaml

    with open(out / "config.yaml") as f:
        saved = yaml.safe_load(f)
    used = saved["class_balance_used"]
    assert saved["class_balance"] == "auto" and used["class_balance"] == imbal.AUTO_IMBALANCED
    assert used["train_counts"] == COUNTS and used["select_metric"] == "balanced_acc"
    best = load_checkpoint(str(out / "best.pt"))
    assert best["best_metric"] == "balanced_acc"
    assert float(best["best_acc"]) == pytest.approx(max(float(r["val_bal_acc"]) for r in rows), abs=1e-3)
    assert res["best_acc"] == pytest.approx(float(best["best_acc"]))


@pytest.mark.parametrize("mode", ["loss", "sampler", "sqrt"])
def test_cached_features_path_applies_the_balance(imb, tmp_path, monkeypatch, mode):
    """finetune.yaml's path (frozen backbone, cached pooled features): the head trains with the weighted loss /
    on the balanced draw too."""
    import utils.train_loop as tl

    seen = {"criterion": set(), "targets": []}
    real_step = tl.train_step

    def spy(ctx, images, targets):
        seen["criterion"].add(type(ctx.criterion).__name__)
        seen["targets"].append(targets.clone())
        return real_step(ctx, images, targets)

    monkeypatch.setattr(tl, "train_step", spy)
    train.main(TINY + ["--epochs", "6", "--freeze", "features", "--set", "cache_features=true",
                       "--set", f"class_balance={mode}", "--data", imb, "--out", str(tmp_path / mode)])
    counts = torch.bincount(torch.cat(seen["targets"]), minlength=3).tolist()
    assert sum(counts) == 6 * 28
    if mode == "loss":
        assert seen["criterion"] == {"WeightedCrossEntropy"} and counts == [96, 48, 24]
    elif mode == "sampler":
        assert seen["criterion"] == {"CrossEntropyLoss"} and all(36 <= n <= 76 for n in counts), counts
    else:  # sqrt: about 168 x (4, 2.83, 2) / 8.83 = 76, 54, 38 (natural order would be 96, 48, 24)
        assert seen["criterion"] == {"CrossEntropyLoss"} and counts[0] > counts[1] > counts[2] > 24, counts


def test_balanced_folder_keeps_plain_training(tmp_path, capsys):
    data = imbalanced_split(tmp_path / "bal", {"Bag": 6, "Sandal": 6, "Trouser": 6})
    train.main(TINY + ["--epochs", "1", "--lr", "0.05", "--data", data, "--out", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert "class balance of train: every class 6 images: ratio 1.0 (< 1.5: balanced)" in text
    assert "class_balance none (auto: balanced training folder" in text
    assert "select_metric top1: best.pt = best val top-1" in text


# ------------------------------------------------------------------------------------ split_dataset.py
def test_split_dataset_prints_the_imbalance_and_the_plan(tmp_path):
    raw = tmp_path / "raw"
    for c, n in {"Bag": 20, "Sandal": 10, "Trouser": 5}.items():
        os.makedirs(raw / c)
        for f in sorted(os.listdir(os.path.join(SAMPLE, c)))[:n]:
            os.symlink(os.path.join(SAMPLE, c, f), raw / c / f)
    r = subprocess.run([sys.executable, "split_dataset.py", str(raw), str(tmp_path / "out"), "--val", "0.2",
                        "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "class balance of train: largest Bag 16, smallest Trouser 4: ratio 4.0 (>= 1.5: imbalanced); " in r.stdout
    assert f"(class_balance={imbal.AUTO_IMBALANCED})" in r.stdout
    assert "best val balanced accuracy as best.pt (select_metric=auto -> balanced_acc)" in r.stdout
    r = subprocess.run([sys.executable, "split_dataset.py", SAMPLE, str(tmp_path / "even"), "--quiet"], cwd=ROOT,
                       capture_output=True, text=True)
    assert "ratio 1.0 (< 1.5: balanced); train.py (class_balance=auto) trains as is (class_balance=none)" in r.stdout


# ------------------------------------------------------------------------------------ which epoch is best.pt
def _keeps(select_se, values, se=2.0):
    from types import SimpleNamespace

    run = SimpleNamespace(cfg=SimpleNamespace(select_se=select_se), best_acc=0.0, best_se=0.0, kept=None)
    return [e for e, v in enumerate(values, 1) if train.keep_as_best(run, e, v, se)], run


def test_best_epoch_rule_plain_and_one_standard_error():
    vals = [60.0, 75.6, 72.0, 75.6, 74.0, 73.7, 70.0]
    saved, run = _keeps(0, vals)  # plain: the first epoch with the best value
    assert saved == [1, 2] and run.kept == {"epoch": 2, "value": 75.6} and run.best_acc == 75.6
    saved, run = _keeps(1, vals)  # latest within 2.0 of 75.6: epoch 6 (73.7); epoch 7 (70.0) is not
    assert saved == [1, 2, 4, 5, 6] and run.kept == {"epoch": 6, "value": 73.7}
    assert (run.best_acc, run.best_se) == (75.6, 2.0)
    saved, run = _keeps(1, vals, se=0.0)  # a val split without noise: the best epoch, ties -> the later one
    assert saved == [1, 2, 4] and run.kept["epoch"] == 4


def test_select_se_keeps_the_latest_epoch_within_the_noise_and_says_so(imb, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "4", "--lr", "0.05", "--data", imb, "--out", str(out), "--set", "select_se=1"])
    text = capsys.readouterr().out
    with open(out / "log.csv") as f:
        bal = [float(r["val_bal_acc"]) for r in csv.DictReader(f)]
    best = load_checkpoint(str(out / "best.pt"))
    # the 12-image val split: 4 per class, so one image is 8.3 points of balanced accuracy and the SE is large
    assert best["best_acc"] == pytest.approx(max(bal), abs=1e-3) and 5 < best["best_se"] < 30
    want = max(e for e, v in enumerate(bal, 1) if v >= max(bal) - best["best_se"] - 1e-6)
    assert best["epoch"] == best["best_kept"]["epoch"] == want
    assert best["best_kept"]["value"] == pytest.approx(bal[want - 1], abs=1e-3)
    if bal[want - 1] < max(bal):
        assert f"(holds epoch {want}, {bal[want - 1]:.2f}%: the latest within 1 standard error(s)" in text
    assert ("select_metric balanced_acc: best.pt = the latest epoch within 1 standard error(s) of the best val "
            "balanced accuracy (auto:") in text  # the header says what the rule keeps, not just "best"
    with pytest.raises(UserError, match="select_se must be 0"):
        build_config(None, "x", {}, ["select_se=-1"])


def test_logit_adjust_wraps_the_training_loss_with_the_draw_prior(imb, tmp_path, monkeypatch):
    """--set logit_adjust=1 on the sqrt draw: every step's loss adds log(share of each class in the draw) to the
    logits (16 / 8 / 4 images -> shares 4 : 2.83 : 2); validation's loss stays plain cross-entropy."""
    import utils.train_loop as tl

    seen = {"offsets": [], "val": set()}
    real_step, real_validate = tl.train_step, train.validate

    def spy(ctx, images, targets):
        assert isinstance(ctx.criterion, B.LogitAdjusted)
        seen["offsets"].append(ctx.criterion.offset.clone())
        return real_step(ctx, images, targets)

    def spy_validate(model, loader, criterion, *a, **k):
        seen["val"].add(type(criterion).__name__)
        return real_validate(model, loader, criterion, *a, **k)

    monkeypatch.setattr(tl, "train_step", spy)
    monkeypatch.setattr(train, "validate", spy_validate)
    train.main(TINY + ["--epochs", "2", "--freeze", "features", "--set", "cache_features=true",
                       "--set", "class_balance=sqrt", "--set", "logit_adjust=1", "--data", imb,
                       "--out", str(tmp_path / "la")])
    share = torch.tensor([4.0, 8 ** 0.5, 2.0])
    expected = (share / share.sum()).log()
    assert seen["offsets"] and all(torch.allclose(o, expected) for o in seen["offsets"])
    assert seen["val"] == {"CrossEntropyLoss"}
    with pytest.raises(UserError, match="logit_adjust must be 0"):
        build_config(None, "x", {}, ["logit_adjust=-1"])
