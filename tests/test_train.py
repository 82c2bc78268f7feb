"""train.py end to end on real Fashion-MNIST sample images (tiny model, CPU): exact resume after a kill and
after Ctrl-C mid-epoch, checkpoint format and atomicity, NaN stop, frozen backbone, and the user-error cases."""
import csv
import os
import signal

import pytest
import torch
from cli_helpers import run_together
from eval_helpers import link_sample_split

import evaluate
import train
from utils import config as C
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
TINY = ["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--batch-size", "16", "--workers", "0",
        "--device", "cpu", "--set", "resize_size=32", "--set", "progress=false", "--set", "amp=off"]


def _split(root, n_train=12, n_val=4, classes=None):
    return link_sample_split(str(root), n_train, n_val, classes)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _split(tmp_path_factory.mktemp("fmnist"))


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_s")} for r in csv.DictReader(f)]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


RECIPE = ["--epochs", "3", "--lr", "0.05", "--set", "warmup_epochs=1", "--set", "ema_decay=0.9",
          "--set", "mixup_alpha=0.2", "--set", "label_smoothing=0.1", "--set", "no_wd_norm_bias=true"]


def run_killed_then_resumed(args, out, monkeypatch, cut_after=1):
    """``train.main(args + --out out)`` interrupted by a real SIGINT right after the epoch that makes log.csv
    ``cut_after`` rows long was logged, checkpointed and plotted (its last act), then continued with
    ``--resume out/last.pt``."""
    real_plot = train.plot_curves

    def plot_then_signal(logs, png, **kw):
        real_plot(logs, png, **kw)
        if len(_rows(logs[0])) == cut_after:
            os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt at the next bytecode

    monkeypatch.setattr(train, "plot_curves", plot_then_signal)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(args + ["--out", str(out)])
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(train, "plot_curves", real_plot)
    assert load_checkpoint(os.path.join(str(out), "last.pt"))["epoch"] == cut_after
    train.main(["--resume", os.path.join(str(out), "last.pt")])  # config, data and out come from the checkpoint


# The memory cache, and the disk loader with a worker process (a photo folder's usual path): its persistent worker
# starts at epoch 1 in one run and at the resume epoch in the other, which must not move any random draw.
@pytest.mark.parametrize("loader", [[], ["--set", "cache=none", "--workers", "1"]], ids=["memory", "disk-worker"])
def test_kill_after_epoch_then_resume_is_exact(data, tmp_path, monkeypatch, loader):
    full = train.main(TINY + RECIPE + loader + ["--data", data, "--out", str(tmp_path / "full")])
    assert full["last"]["epoch"] == 3

    # "kill" the second run right after epoch 1 was logged and checkpointed
    run_killed_then_resumed(TINY + RECIPE + loader + ["--data", data], tmp_path / "cut", monkeypatch)

    a, b = load_checkpoint(str(tmp_path / "full" / "last.pt")), load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert _max_diff(a["model"], b["model"]) == 0
    assert _max_diff(a["ema"], b["ema"]) == 0
    assert a["step"] == b["step"] == 3 * 8 and a["epoch"] == b["epoch"] == 3
    assert _rows(str(tmp_path / "full" / "log.csv")) == _rows(str(tmp_path / "cut" / "log.csv"))


def test_resume_after_an_unreadable_file_was_found_mid_phase_is_exact(tmp_path, monkeypatch, capsys):
    """The disk loader finds a truncated PNG in epoch 1; the run is cut after it and resumed. The resumed run keeps
    the file in its list (skipping it again) as the uninterrupted run does, so epochs 2-3 draw the same images."""
    data = _split(tmp_path / "data")
    sample = os.path.join(SAMPLE, "Bag", sorted(os.listdir(os.path.join(SAMPLE, "Bag")))[0])
    bad = os.path.join(data, "train", "Bag", "truncated.png")
    with open(sample, "rb") as f, open(bad, "wb") as out:
        out.write(f.read()[:60])  # cut inside the pixel data
    args = TINY + RECIPE + ["--set", "cache=none", "--data", data]
    train.main(args + ["--out", str(tmp_path / "full")])
    run_killed_then_resumed(args, tmp_path / "cut", monkeypatch)
    a, b = load_checkpoint(str(tmp_path / "full" / "last.pt")), load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert a["unreadable"] == b["unreadable"] == [bad]
    assert _max_diff(a["model"], b["model"]) == 0
    rows = _rows(str(tmp_path / "full" / "log.csv"))
    assert rows == _rows(str(tmp_path / "cut" / "log.csv")) and [r["skipped_images"] for r in rows] == ["1"] * 3


def test_ctrl_c_mid_epoch_saves_last_and_resume_is_exact(data, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train.main(TINY + RECIPE + ["--epochs", "2", "--data", data, "--out", str(full)])
    import utils.train_loop as tl

    real_step, calls = tl.train_step, {"n": 0}

    def step_then_interrupt(ctx, *a, **k):
        if calls["n"] == 10:  # global step 10 = 3rd step of epoch 2 (8 steps per epoch: 7 full batches of 16 + the last 8 images)
            def ctrl_c(module, inputs, output):  # a real Ctrl-C in the middle of the forward pass, after the
                hook.remove()                    # first blocks' BatchNorm statistics have moved
                os.kill(os.getpid(), signal.SIGINT)
            hook = ctx.trainable.model.features[4].register_forward_hook(ctrl_c)
        calls["n"] += 1
        return real_step(ctx, *a, **k)

    monkeypatch.setattr(tl, "train_step", step_then_interrupt)
    cut = tmp_path / "cut"
    # Python's own handler even when SIGINT was inherited as ignored (a shell's background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(TINY + RECIPE + ["--epochs", "2", "--data", data, "--out", str(cut)])
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(tl, "train_step", real_step)
    ck = load_checkpoint(str(cut / "last.pt"))  # the step in progress was finished, then the run stopped
    assert ck["epoch"] == 1 and ck["step"] == 11 and ck["partial_epoch"]["batches_done"] == 3
    train.main(["--resume", str(cut / "last.pt")])
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(cut / "last.pt"))
    assert _max_diff(a["model"], b["model"]) == 0 and _max_diff(a["ema"], b["ema"]) == 0
    assert _rows(str(full / "log.csv")) == _rows(str(cut / "log.csv"))


def test_second_ctrl_c_stops_at_once_without_a_half_stepped_checkpoint(data, tmp_path, monkeypatch, capfd):
    import utils.train_loop as tl

    real_step, calls = tl.train_step, {"n": 0}

    out = tmp_path / "cut"

    def step_with_two_ctrl_c(ctx, *a, **k):
        calls["n"] += (out / "last.pt").exists()  # steps of epoch 2 (the speed probe's steps come before)
        if calls["n"] == 3:  # mid-forward of the 3rd step of epoch 2: Ctrl-C, Ctrl-C
            def ctrl_c(module, inputs, output):
                hook.remove()
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            hook = ctx.trainable.model.features[4].register_forward_hook(ctrl_c)
        return real_step(ctx, *a, **k)

    monkeypatch.setattr(tl, "train_step", step_with_two_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as e:
            train.main(TINY + RECIPE + ["--epochs", "2", "--data", data, "--out", str(out)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert type(e.value) is KeyboardInterrupt and signal.getsignal(signal.SIGINT) is previous
    err = capfd.readouterr().err  # the handler writes to fd 2 directly
    assert "Ctrl-C: stopping after this step to save last.pt (Ctrl-C again to stop at once, without saving)" in err
    assert "interrupted mid-step: no mid-epoch checkpoint (it would not resume exactly); last.pt, if any, is from " \
           "an epoch end" in err
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["epoch"] == 1 and ck["step"] == 8 and not ck.get("partial_epoch")  # epoch 1's end, untouched


def test_compiled_run_keeps_odd_batches_eager_and_resumes_exactly(data, tmp_path, monkeypatch):
    """compile=on: 120 images in batches of 16 end each epoch with a batch of 8, which must run eagerly (a
    recompile would raise here); a compiled run killed after epoch 1 and resumed ends bit for bit like an uncut one."""
    import torch._dynamo

    args = TINY + ["--epochs", "2", "--lr", "0.05", "--set", "compile=on", "--data", data]
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    train.main(args + ["--out", str(tmp_path / "full")])
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", False)  # the next runs compile new models
    full = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    assert full["speed"]["compile"] == {"value": True, "reason": "set by the user"}

    run_killed_then_resumed(args, tmp_path / "cut", monkeypatch)
    cut = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert cut["step"] == full["step"] == 2 * 8
    assert _max_diff(full["model"], cut["model"]) == 0


def test_checkpoint_format_log_and_config(data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "2", "--lr", "0.05", "--data", data, "--out", str(out), "--set", "ema_decay=0.5"])
    # one line gives best.pt's val scores in fp32, the numbers evaluate.py reports for it
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("best.pt on val")][-1]
    m = evaluate.main([str(out / "best.pt"), os.path.join(data, "val"), "--out", str(tmp_path / "eval"),
                       "--workers", "0", "--no-progress"])
    assert last.startswith("best.pt on val in fp32 (") and (
        f"as evaluate.py and export.py will report it: top-1 {m['top1']:.2f}%, balanced accuracy "
        f"{m['balanced_acc']:.2f}% (training's validation of that epoch: val top-1 ") in last, last
    assert sorted(os.listdir(out)) == ["best.pt", "config.yaml", "curves.png", "last.pt", "log.csv"]
    ck = torch.load(str(out / "last.pt"), map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema", "epoch", "step", "best_acc", "config",
                "classes", "preprocess", "arch", "rng", "versions"):
        assert key in ck, key
    assert ck["classes"] == sorted(os.listdir(SAMPLE))
    recipe = C.read_yaml(os.path.join(ROOT, "configs", "default.yaml"))  # no --config: the default recipe
    assert ck["preprocess"] == {"img_size": 32, "resize_size": 32, "mean": recipe["mean"], "std": recipe["std"]}
    # no resize_size anywhere: the recipe's crop_pct 1.0 makes the val resize follow --img-size (no border cut)
    assert recipe["crop_pct"] == 1.0 and "resize_size" not in recipe
    args = [a for a in TINY if a != "resize_size=32"]
    args.remove("--set")  # the "--set" that went with resize_size=32
    cfg, _ = train.resolve_config(train.get_args_parser().parse_args(args + ["--img-size", "40"]))
    assert (cfg.img_size, cfg.resize_size) == (40, 40)
    assert ck["arch"] == {"name": "mobilenet_v2", "num_classes": 10, "width_mult": 0.25, "dropout": 0.2,
                          "small_input": False}
    assert ck["config"]["epochs"] == 2 and ck["scaler"] is None
    with open(out / "log.csv") as f:
        header = f.readline().strip()
    assert header == ("epoch,lr,train_loss,train_acc,val_loss,val_top1,val_top5,val_bal_acc,val_macro_f1,epoch_seconds,"
                      "images_per_s,skipped_images")
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # best.pt holds the epoch with the best val top-1 (a balanced folder: select_metric auto -> top1), and
    # validation used the EMA weights it stores
    best = load_checkpoint(str(out / "best.pt"))
    assert float(best["best_acc"]) == max(float(r["val_top1"]) for r in rows)
    model = model_from_checkpoint(best)
    assert _max_diff(model.state_dict(), best["ema"]) == 0
    assert any((best["ema"][k].float() - best["model"][k].float()).abs().max() > 0 for k in best["model"])
    # train.py fitted temperature and reject threshold on val and stored them in best.pt (docs/trust.md)
    cal = best["calibration"]
    assert cal["temperature"] > 0 and 0 <= cal["threshold"] <= 1 and cal["target_accuracy"] == 0.99
    assert cal["images"] == sum(len(os.listdir(os.path.join(data, "val", c))) for c in os.listdir(os.path.join(data, "val")))


def test_failed_checkpoint_write_keeps_the_previous_file(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    state = {"epoch": 0}

    def save_then_fail(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2:  # the second epoch's write dies half-way
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        train.main(TINY + ["--epochs", "2", "--lr", "0.05", "--data", data, "--out", str(out)])
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1  # intact previous checkpoint
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # no temp debris
    del state


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good(data, tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "1", "--lr", "0.05", "--data", data, "--out", str(out)])
    good = load_checkpoint(str(out / "last.pt"))
    # resume with an absurd learning rate: the weights overflow and the loss turns non-finite in epoch 2
    with pytest.raises(UserError) as e:
        train.main(["--resume", str(out / "last.pt"), "--epochs", "3", "--lr", "1e30", "--set", "warmup_epochs=0"])
    msg = str(e.value)
    assert msg.startswith("training diverged: loss is nan at epoch 2, step ") or \
        msg.startswith("training diverged: loss is inf at epoch 2, step "), msg
    assert "last good checkpoint" in msg and str(out / "last.pt") in msg
    kept = load_checkpoint(str(out / "last.pt"))
    assert kept["epoch"] == 1 and _max_diff(kept["model"], good["model"]) == 0


def test_frozen_backbone_trains_only_the_head(data, tmp_path):
    from models import build_model, load_pretrained

    init = build_model("mobilenet_v2", num_classes=10)
    load_pretrained(init, "imagenet")  # the real fine-tuning case: ImageNet features, new 10-class head
    for cached in ("false", "true"):
        out = tmp_path / f"run_{cached}"
        train.main(TINY + ["--width-mult", "1.0", "--epochs", "3", "--lr", "0.05", "--data", data, "--out", str(out),
                           "--freeze", "features", "--pretrained", "imagenet", "--set", f"cache_features={cached}",
                           "--set", "label_smoothing=0.0", "--set", "warmup_epochs=0"])
        ck = load_checkpoint(str(out / "last.pt"))
        for k, v in init.state_dict().items():
            if k.startswith("features."):  # weights and BatchNorm running statistics untouched
                assert torch.equal(ck["model"][k], v), k
        assert not torch.equal(ck["model"]["classifier.1.weight"], init.state_dict()["classifier.1.weight"])
        rows = list(csv.DictReader(open(out / "log.csv")))
        assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]), rows


def _error_line(r):
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    # progress bars may precede it; the error itself is exactly one line, the last one
    assert sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error:"), lines
    return r.returncode, lines[-1:]


def test_user_errors_are_one_line(data, tmp_path):
    from models import build_model

    one = _split(tmp_path / "one", 4, 2, classes=["Bag"])  # single-class dataset
    for part in ("train", "val"):  # empty dataset (class folders without images)
        for c in ("a", "b"):
            os.makedirs(tmp_path / "empty" / part / c)
    # pretrained weights of another architecture
    torch.save(build_model("mobilenet_v3_small", num_classes=10).state_dict(), str(tmp_path / "v3.pth"))
    train_py = os.path.join(ROOT, "train.py")
    missing, single, empty, v3 = (_error_line(r) for r in run_together([
        [train_py, *TINY, "--data", str(tmp_path / "missing")],
        [train_py, *TINY, "--data", one, "--out", str(tmp_path / "o1")],
        [train_py, *TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")],
        [train_py, *TINY, "--data", data, "--out", str(tmp_path / "o3"), "--pretrained", str(tmp_path / "v3.pth")],
    ], cwd=str(tmp_path), env=dict(os.environ), timeout=300))
    code, err = missing
    assert code == 2 and len(err) == 1 and err[0].startswith("error: data folder") and "missing" in err[0]
    code, err = single
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "class" in err[0]
    code, err = empty
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")
    code, err = v3
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "v3.pth" in err[0]
    assert not (tmp_path / "o3" / "last.pt").exists()


def test_a_run_folder_is_never_overwritten_without_asking(data, tmp_path):
    """Re-running a command (Ctrl-C, then the same line instead of --resume) must not replace the run it made."""
    out = tmp_path / "run"
    args = TINY + ["--epochs", "1", "--data", data, "--out", str(out)]
    train.main(args)
    before = {f: (out / f).read_bytes() for f in ("last.pt", "best.pt", "log.csv")}
    with pytest.raises(UserError) as e:
        train.main(args)
    assert str(e.value) == (f"{out} already holds a run (last.pt, best.pt, log.csv); continue it with --resume "
                            f"{out / 'last.pt'}, choose another --out, or pass --overwrite to replace it")
    assert {f: (out / f).read_bytes() for f in before} == before
    train.main(args + ["--overwrite", "--seed", "1"])  # asked for: a new run replaces the old files
    assert (out / "last.pt").read_bytes() != before["last.pt"]
    assert load_checkpoint(str(out / "last.pt"))["config"]["seed"] == 1
    # a run stopped before its first epoch ended (two Ctrl-C in the feature pass) left only log.csv's header:
    # nothing to resume or lose, so the same command simply starts
    empty = tmp_path / "stopped_early"
    empty.mkdir()
    (empty / "log.csv").write_text((out / "log.csv").read_text().splitlines()[0] + "\r\n")
    train.main(TINY + ["--epochs", "1", "--data", data, "--out", str(empty)])
    assert (empty / "last.pt").is_file()


def test_corrupt_training_image_is_skipped_and_reported(tmp_path, capsys):
    root = _split(tmp_path / "d", n_train=6, n_val=2, classes=["Bag", "Coat"])
    bad = os.path.join(root, "train", "Bag", "broken.png")
    with open(os.path.join(SAMPLE, "Bag", sorted(os.listdir(os.path.join(SAMPLE, "Bag")))[0]), "rb") as f:
        head = f.read()[:60]  # a real PNG cut short: decodes as truncated
    with open(bad, "wb") as f:
        f.write(head)
    with open(os.path.join(root, "val", "Coat", "broken_val.png"), "wb") as f:
        f.write(head)  # a bad val image is met again every epoch: still one file
    train.main(TINY + ["--epochs", "2", "--data", root, "--out", str(tmp_path / "run"), "--set", "cache=none"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "broken" in line]  # one line per file, though met every epoch
    assert len(lines) == 2 and all(line.startswith("warning: skipped unreadable image ") for line in lines)
    assert f"image {bad} (" in lines[0] and f"{os.path.join('val', 'Coat', 'broken_val.png')} (" in lines[1]
    assert "skipped 2 unreadable image(s) so far" in out and (tmp_path / "run" / "best.pt").is_file()
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        assert [r["skipped_images"] for r in csv.DictReader(f)] == ["2", "2"]  # distinct files, not events


def test_no_progress_flag_turns_the_bars_off(data):
    """`--no-progress` is the flag for `--set progress=false` (evaluate.py and predict.py have the same flag)."""
    def parsed(*extra):
        return train.resolve_config(train.get_args_parser().parse_args(["--data", data, *extra]))[0]
    assert parsed().progress is True
    assert parsed("--no-progress").progress is False
    assert "--no-progress" in train.get_args_parser().format_help()


@pytest.mark.parametrize("collective, stops_after", [(False, 4), (True, 5)])
def test_ctrl_c_stops_one_process_after_the_current_step_torchrun_at_the_next_read(collective, stops_after):
    """One process reads its Ctrl-C flag after every step, even where values are read only every ``sync_every``
    steps (a GPU: 20); under torchrun the check is a collective, made every ``sync_every`` steps on every process."""
    from torch import nn

    from models import build_model
    from utils.rank_state import StopRequest, StopRequested
    from utils.schedule import WarmupCosine
    from utils.train_loop import EpochProgress, StepContext, Trainable, train_one_epoch

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=10, width_mult=0.25)
    ctx = StepContext(Trainable(model), torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(),
                      torch.device("cpu"), channels_last=False, params=list(model.parameters()))
    stop = StopRequest(torch.device("cpu"), collective=collective)  # not installed: the test sets its flag

    def batches():
        for i in range(10):
            if i == 3:
                stop.requested = True  # Ctrl-C while the 4th batch loads
            yield torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    progress = EpochProgress()
    with pytest.raises(StopRequested):
        train_one_epoch(ctx, batches(), WarmupCosine(0.01, 100), 1, progress, sync_every=5, stop=stop)
    assert progress.batches_done == stops_after
