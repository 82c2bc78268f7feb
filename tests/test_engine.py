"""utils/deploy/engine.py on real photos: onnxruntime gives PyTorch's features/logits within export.py's tolerance, every
fallback lands on PyTorch with its reason, and train.py / evaluate.py / predict.py record which engine ran."""
import csv
import os
import re
import sys
import time

import pytest
import torch
import yaml
from eval_helpers import (
    PREPROCESS,
    export_onnx,
    link_sample_split,
    make_checkpoint,
    make_class_folders,
    photo_paths,
)
from PIL import Image

import evaluate
import predict
import train
import utils.deploy.engine as engine_mod
from models import build_model, load_pretrained
from utils import machine
from utils.checkpoint import load_checkpoint
from utils.data import build_eval_transform
from utils.deploy.engine import ThreadProbe, fast_forward, parity

NAMES = [os.path.splitext(os.path.basename(p))[0] for p in photo_paths()]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def photos():
    tf = build_eval_transform(PREPROCESS)
    return torch.stack([tf(Image.open(p)) for p in photo_paths()])


@pytest.fixture(scope="module")
def backbone():
    """ImageNet MobileNetV2 at 32 px: real pooled features (distinct per photo), a few M MACs."""
    model = build_model("mobilenet_v2", num_classes=1000)
    load_pretrained(model, "imagenet")
    return model.eval()


def reference(model, x, method="forward"):
    with torch.no_grad():
        return getattr(model, method)(x)


def test_onnxruntime_features_match_pytorch_on_real_photos(backbone, photos):
    ref = reference(backbone, photos, "forward_features")
    assert ref.shape == (12, 1280) and ref.abs().max() > 1  # real features, not a near-zero tensor
    eng = fast_forward(backbone, photos[:8], method="forward_features", engine="onnxruntime", threads=1)
    assert eng.choice.value == "onnxruntime"
    assert "PyTorch eager on the first batch, same output (max difference" in eng.choice.reason
    rest = eng.run(photos[8:])  # another batch size through the dynamic batch axis
    got = torch.cat([eng.first, rest])
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    allowed = 1e-4 * max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= allowed
    assert not torch.equal(got[0], got[1])  # per-photo outputs, not one broadcast row


def test_auto_picks_onnxruntime_for_a_long_pass_and_pytorch_for_a_short_one(backbone, photos):
    long = fast_forward(backbone, photos, method="forward_features", images=None, threads=1)
    short = fast_forward(backbone, photos, method="forward_features", images=len(photos), threads=1)
    # onnxruntime measured several times PyTorch's speed here; a first batch that ran slower would say so
    assert long.choice.value == "onnxruntime" or "x PyTorch's speed" in long.choice.reason, long.choice
    assert short.choice.value == "pytorch" and "the pass is short" in short.choice.reason
    torch.testing.assert_close(short.first, reference(backbone, photos, "forward_features"), rtol=0, atol=1e-6)


def test_onnxruntime_missing_falls_back_to_pytorch(backbone, photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    eng = fast_forward(backbone, photos, method="forward_features", engine="onnxruntime")
    assert eng.choice.value == "pytorch"
    assert eng.choice.reason == ("PyTorch eager fp32 channels_last: onnxruntime is not installed "
                                 "(pip install onnxruntime onnx)")
    ref = reference(backbone, photos, "forward_features")
    torch.testing.assert_close(eng.first, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(eng.run(photos[:3]), ref[:3], rtol=0, atol=1e-6)


def test_parity_mismatch_falls_back_to_pytorch(backbone, photos, monkeypatch):
    real_runner = engine_mod.onnx_runner

    def off_by_a_little(sess):
        run = real_runner(sess)
        return lambda x: run(x) + 0.01  # 0.01 > 1e-4 x the largest |feature| (~5)

    monkeypatch.setattr(engine_mod, "onnx_runner", off_by_a_little)
    eng = fast_forward(backbone, photos, method="forward_features", engine="onnxruntime", threads=1)
    assert eng.choice.value == "pytorch"
    assert "onnxruntime differs from PyTorch on the first batch (max difference 0.01 > allowed" in eng.choice.reason
    assert eng.choice.reason.endswith("tolerance 0.0001)")
    torch.testing.assert_close(eng.run(photos), reference(backbone, photos, "forward_features"), rtol=0, atol=1e-6)


def test_slower_onnxruntime_stays_on_pytorch(backbone, photos, monkeypatch):
    real_runner = engine_mod.onnx_runner

    def slow(sess):
        run = real_runner(sess)

        def run_slowly(x):
            time.sleep(1.0)  # PyTorch runs these 12 photos at 32 px in a few ms
            return run(x)
        return run_slowly

    monkeypatch.setattr(engine_mod, "onnx_runner", slow)
    eng = fast_forward(backbone, photos, method="forward_features", threads=1)
    assert eng.choice.value == "pytorch"
    assert re.fullmatch(r"PyTorch eager fp32 channels_last: onnxruntime ran the first batch at 0\.\d\dx PyTorch's "
                        r"speed", eng.choice.reason), eng.choice.reason


def test_export_failure_falls_back_to_pytorch(backbone, photos, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("Unsupported operator\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    eng = fast_forward(backbone, photos[:4], engine="onnxruntime")
    assert eng.choice.value == "pytorch"
    assert eng.choice.reason.endswith("ONNX export failed (RuntimeError: Unsupported operator)")
    assert eng.first.shape == (4, 1000)


def test_thread_probe_compares_sessions_on_the_pass_and_keeps_the_faster():
    ran = []

    def session(threads, seconds):
        def run(x):
            time.sleep(seconds)
            ran.append(threads)
            return torch.full((len(x), 1), float(threads))
        return run

    choice = machine.Choice("onnxruntime", "checked")
    probe = ThreadProbe({2: session(2, 0.03), 1: session(1, 0.003)}, choice)
    assert choice.reason == "checked; 2 threads vs 1 thread: the pass ended before the comparison (16 batches)"
    outs = [probe(torch.zeros(4, 3)) for _ in range(20)]
    assert ran == [2] * 4 + [1] * 4 + [2] * 4 + [1] * 4 + [1] * 4  # blocks of 4, two rounds, then the winner
    assert [int(o[0, 0]) for o in outs] == ran  # each batch's output is the session's that ran it
    assert choice.reason.startswith("checked; 1 thread: ")
    assert choice.reason.endswith("with 2 threads over the pass's first 16 batches (decoding included)")


def test_feature_pass_workers_and_threads():
    two = machine.CpuInfo("test CPU", 2, ("avx2",), "AVX2", False)
    eight = machine.CpuInfo("test CPU", 8, ("avx2",), "AVX2", False)
    cpu = torch.device("cpu")
    assert machine.decide_workers(-1, cpu, two, feature_pass=True).value == 0  # decode between batches
    assert machine.decide_workers(-1, cpu, two).value == 1  # training steps keep their decode worker
    assert machine.decide_workers(-1, cpu, eight, feature_pass=True).value == 1
    assert machine.decide_workers(3, cpu, two, feature_pass=True).value == 3  # the user's number wins
    assert machine.decide_forward_threads(0, budget=2).value == (2,)
    assert machine.decide_forward_threads(1, budget=2).value == (2, 1)  # compared on the pass (ThreadProbe)
    assert machine.decide_forward_threads(1, budget=1).value == (1,)


def test_parity_rule_is_export_py_s():
    ref = torch.tensor([[0.5, 0.2], [30.0, -1.0]])
    assert parity(ref, ref + 2.9e-3)[0]  # allowed 1e-4 x 30 (largest |value|)
    assert not parity(ref, ref + 3.1e-3)[0]
    small = torch.tensor([[0.5, 0.2]])
    assert parity(small, small + 0.9e-4)[0] and not parity(small, small + 1.1e-4)[0]  # absolute within +-1
    flipped = torch.tensor([[0.20001, 0.2]])
    assert parity(torch.tensor([[0.2, 0.20001]]), flipped)[0]  # features: values only
    ok, detail = parity(torch.tensor([[0.2, 0.20001]]), flipped, same_top1=True)  # logits: top-1 must agree too
    assert not ok and detail == "top-1 differs on 1/1 images"
    assert not parity(ref, torch.full_like(ref, float("nan")))[0]


def _frozen_run(data, out):
    return train.main(["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--batch-size", "16",
                       "--workers", "0", "--device", "cpu", "--set", "resize_size=32", "--set", "progress=false",
                       "--epochs", "2", "--lr", "0.05", "--data", data, "--out", str(out), "--freeze", "features",
                       "--set", "cache_features=true", "--pretrained", "none"])


def _log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def prefer_onnxruntime(monkeypatch):
    """Tiny passes count as long enough to export, and onnxruntime wins any first-batch race (no timing luck)."""
    monkeypatch.setattr(engine_mod, "MIN_PASS_SECONDS", 0.0)
    monkeypatch.setattr(engine_mod, "MIN_SPEEDUP", 0.0)


def test_frozen_finetune_run_records_the_engine(tmp_path, monkeypatch, capsys):
    data = link_sample_split(str(tmp_path / "data"), 12, 4)
    prefer_onnxruntime(monkeypatch)
    _frozen_run(data, tmp_path / "ort")
    header = capsys.readouterr().out
    recorded = yaml.safe_load(open(tmp_path / "ort" / "config.yaml"))["speed"]["feature_engine"]
    assert recorded["value"] == "onnxruntime", recorded
    assert "x PyTorch eager on the first batch, same output" in recorded["reason"]
    assert f"  feature_engine: onnxruntime - {recorded['reason']}" in header
    ck = load_checkpoint(str(tmp_path / "ort" / "last.pt"))
    assert ck["speed"]["feature_engine"] == recorded

    monkeypatch.setattr(engine_mod, "MIN_PASS_SECONDS", 1e9)  # now every pass is "short": PyTorch
    _frozen_run(data, tmp_path / "pt")
    pt = load_checkpoint(str(tmp_path / "pt" / "last.pt"))["speed"]["feature_engine"]
    assert pt["value"] == "pytorch" and "the pass is short" in pt["reason"]
    # the head trained on onnxruntime's features learns what it learns on PyTorch's
    for a, b in zip(_log(tmp_path / "ort" / "log.csv"), _log(tmp_path / "pt" / "log.csv")):
        for key in ("train_loss", "val_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4)

    # resumed on this machine, the features are recomputed with the same engine (bit-for-bit continuation)
    assert train.resumed_feature_engine(ck) == "onnxruntime"
    assert train.resumed_feature_engine({"speed": {**ck["speed"], "machine": "another CPU"}}) == "auto"
    assert train.resumed_feature_engine(None) == "auto"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_eval")
    ckpt = make_checkpoint(str(d / "best.pt"), NAMES, [(p, i) for i, p in enumerate(photo_paths())])
    data = make_class_folders(str(d / "val"), {n: [p] for n, p in zip(NAMES, photo_paths())})
    return ckpt, export_onnx(ckpt, str(d / "model.onnx")), data


def test_evaluate_checkpoint_reports_engine_and_matches_onnx(fitted, tmp_path, monkeypatch, capsys):
    ckpt, onnx_path, data = fitted
    prefer_onnxruntime(monkeypatch)
    m_ckpt = evaluate.main([ckpt, data, "--out", str(tmp_path / "a"), "--workers", "0", "--no-progress",
                            "--batch-size", "5"])
    out = capsys.readouterr().out
    m_onnx = evaluate.main([onnx_path, data, "--out", str(tmp_path / "b"), "--workers", "0", "--no-progress"])
    assert m_ckpt["kind"] == "checkpoint" and m_ckpt["engine"] == "onnxruntime"
    assert "same output" in m_ckpt["engine_reason"]
    assert f"engine: onnxruntime - {m_ckpt['engine_reason']}" in out
    assert "onnxruntime on cpu)" in out.splitlines()[-1]  # the summary line names the engine
    assert m_onnx["engine"] == "onnxruntime" and m_onnx["kind"] == "onnx"
    assert m_ckpt["top1"] == m_onnx["top1"] >= 75 and m_ckpt["top5"] == m_onnx["top5"]
    assert m_ckpt["loss"] == pytest.approx(m_onnx["loss"], abs=1e-5)
    assert [r["f1"] for r in m_ckpt["per_class"]] == [r["f1"] for r in m_onnx["per_class"]]


def test_predict_checkpoint_names_engine_and_matches_onnx(fitted, monkeypatch, capsys):
    ckpt, onnx_path, _ = fitted
    prefer_onnxruntime(monkeypatch)
    a = predict.main([ckpt, *photo_paths(), "--no-progress", "--workers", "0", "--topk", "3"])
    out = capsys.readouterr().out
    b = predict.main([onnx_path, *photo_paths(), "--no-progress", "--workers", "0", "--topk", "3"])
    assert "engine: onnxruntime - onnxruntime fp32" in out and "onnxruntime on cpu)" in out
    for pa, pb in zip(a["predictions"], b["predictions"]):
        assert [t["class"] for t in pa["top"]] == [t["class"] for t in pb["top"]]
        assert [t["prob"] for t in pa["top"]] == pytest.approx([t["prob"] for t in pb["top"]], abs=1e-5)


def test_few_images_stay_on_pytorch_without_export(fitted, monkeypatch):
    ckpt, _, _ = fitted

    def no_export(*args, **kwargs):
        raise AssertionError("a 12-photo pass must not export")

    monkeypatch.setattr(engine_mod, "export_sessions", no_export)
    r = predict.main([ckpt, *photo_paths(), "--no-progress", "--workers", "0"])
    assert len(r["predictions"]) == 12
    from utils.deploy.runtime import open_model

    m = open_model(ckpt)
    assert m.engine.value == "pending"
    m.predict_batch(torch.stack([build_eval_transform(m.preprocess)(Image.open(p)) for p in photo_paths()[:2]]))
    assert m.engine.value == "pytorch" and "the pass is short" in m.engine.reason
    assert machine.Choice is type(m.engine)


def test_benchmark_features_times_each_engine_on_real_photos(tmp_path, monkeypatch, capsys):
    import argparse

    from utils.bench import features as bench_features
    from utils.errors import UserError

    monkeypatch.setenv("GOMP_SPINCOUNT", "3000")  # as train.py sets it; otherwise the benchmark restarts itself
    parser = argparse.ArgumentParser()
    bench_features.add_arguments(parser)
    out = tmp_path / "features.csv"
    args = parser.parse_args(["--images", "24", "--repeats", "1", "--img-size", "32", "--batch-size", "8",
                              "--pretrained", "none", "--width-mult", "0.25", "--out", str(out),
                              "--variants", "pytorch/w0/t1", "onnxruntime/w0/t1"])
    bench_features.run(args)
    rows = list(csv.DictReader(open(out)))
    assert [r["variant"] for r in rows] == ["pytorch/w0/t1", "onnxruntime/w0/t1"]
    assert all(float(r["images_per_s"]) > 0 for r in rows) and rows[0]["vs_pytorch"] == "1.0"
    assert rows[1]["engine"].startswith("onnxruntime, 0 workers, 1 threads: onnxruntime fp32 (1 thread)")
    assert "| pytorch/w0/t1 |" in capsys.readouterr().out
    with pytest.raises(UserError, match="variant 'ort/1/2': write ENGINE/wWORKERS/tTHREADS"):
        bench_features.parse_variant("ort/1/2")
