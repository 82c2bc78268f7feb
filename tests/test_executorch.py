"""Phone files: model.pt2 (torch.export), model.pte and model.int8.pte (ExecuTorch, XNNPACK) on a tiny real model.

Each file is run through the runtime a user has (torch.export.load, ExecuTorch's Python runtime), compared with the
checkpoint on real validation images, and opened by predict.py / evaluate.py / benchmark.py infer like any format.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from export_helpers import make_run

import export
import predict
from utils.bench import infer as bench_infer
from utils.checkpoint import load_checkpoint, pruned_state, save_checkpoint
from utils.data import list_labelled_images
from utils.deploy import executorch_export as etx
from utils.deploy import export as ex
from utils.deploy.runtime import detect_kind, open_model
from utils.errors import UserError
from utils.pruning import prune_expanded_channels
from utils.trust.calibration import write_calibration_to_checkpoint

CALIBRATION = {"temperature": 1.5, "threshold": 0.8, "target_accuracy": 0.99}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_executorch = pytest.mark.skipif(etx.executorch_problem() is not None,
                                      reason=f"ExecuTorch not importable: {etx.executorch_problem()}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny real checkpoint (32 px MobileNetV2, Fashion-MNIST sample) and its pt2 + ExecuTorch fp32/int8 export."""
    ckpt = make_run(str(tmp_path_factory.mktemp("et")))
    write_calibration_to_checkpoint(ckpt, CALIBRATION)  # travels into every file like the class names
    if etx.executorch_problem():
        return ckpt, None, None
    out = os.path.join(os.path.dirname(ckpt), "phone")
    # 80 val images: 1 image = 1.25 points; the int8 check's interval, not one flipped image, decides
    report = export.main([ckpt, "--format", "pt2", "executorch_int8", "--out", out, "--max-drop", "5"])
    return ckpt, out, report


def _val(ckpt):
    c = torch.load(ckpt, weights_only=True)
    items = list_labelled_images(os.path.join(c["config"]["data"], "val"), c["classes"])
    return ex.load_images([p for p, _ in items], c["preprocess"]), torch.tensor([y for _, y in items]), c


@needs_executorch
def test_files_checks_and_report(run):
    ckpt, out, report = run
    assert sorted(os.listdir(out)) == ["export.json", "model.int8.pte", "model.pt2", "model.pte"]  # nothing unverified
    on_disk = json.load(open(os.path.join(out, "export.json")))
    for fmt in ("pt2", "executorch"):
        chk = on_disk["checks"][fmt]
        assert chk["passed"] and chk["top1_agree"] == chk["images"] == 80
        assert chk["max_abs_diff"] <= 1e-4 * max(1.0, chk["logit_scale"])
    q = on_disk["checks"]["executorch_int8"]
    assert q["passed"] and q["val_images"] == 80 and q["fp32_top1"] > 40
    files = on_disk["files"]
    assert files["executorch"]["backend"] == "XNNPACK" and files["executorch"]["input_shape"] == [1, 3, 32, 32]
    assert files["executorch"]["not_delegated_ops"] == [] and files["executorch_int8"]["not_delegated_ops"] == []
    assert files["executorch_int8"]["bytes"] < 0.35 * files["executorch"]["bytes"]  # int8 weights: ~4x smaller
    assert on_disk["versions"]["executorch"] == etx.executorch_version()


@needs_executorch
def test_pte_runs_in_executorch_runtime_with_metadata_inside(run):
    """Read the program the way an app does: ExecuTorch's runtime, metadata from the constant methods."""
    from executorch.runtime import Runtime

    ckpt, out, report = run
    x, labels, c = _val(ckpt)
    program = Runtime.get().load_program(os.path.join(out, "model.pte"))
    assert set(program.method_names) == {"forward", "classes", "preprocess", "calibration"}
    assert json.loads(program.load_method("calibration").execute([])[0]) == CALIBRATION
    assert json.loads(program.load_method("classes").execute([])[0]) == c["classes"]
    assert json.loads(program.load_method("preprocess").execute([])[0]) == c["preprocess"]
    forward = program.load_method("forward")
    got = torch.cat([forward.execute([x[i:i + 1]])[0].clone() for i in range(len(x))])
    ref = ex.load_export_source(ckpt).model(x).detach()
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # the int8 program: accuracy recomputable from the file, same metadata
    q = open_model(os.path.join(out, "model.int8.pte"))
    assert q.kind == "pte" and q.classes == c["classes"] and q.preprocess == c["preprocess"]
    assert q.calibration == CALIBRATION and open_model(os.path.join(out, "model.pt2")).calibration == CALIBRATION
    chk = report["checks"]["executorch_int8"]
    assert abs(ex.top1_percent(q.predict_batch(x), labels) - chk["int8_top1"]) < 0.01


@needs_executorch
def test_pt2_loads_with_plain_torch(run):
    ckpt, out, _ = run
    x, _, c = _val(ckpt)
    code = ("import io, json, sys, torch; extra = {'classes': '', 'preprocess': ''}; "
            "m = torch.export.load(sys.argv[1], extra_files=extra).module(); "
            "x = torch.load(sys.argv[2]); print(json.dumps({'classes': json.loads(extra['classes']), "
            "'top1': m(x).argmax(1).tolist()}))")
    torch.save(x[:7], os.path.join(out, "..", "x.pt"))
    done = subprocess.run([sys.executable, "-c", code, os.path.join(out, "model.pt2"), os.path.join(out, "..", "x.pt")],
                          capture_output=True, text=True, cwd="/", timeout=300)  # no repository code on the path
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    ref = ex.load_export_source(ckpt).model(x[:7]).argmax(1).tolist()
    assert got == {"classes": c["classes"], "top1": ref}
    assert detect_kind(os.path.join(out, "model.pt2")) == "pt2" and detect_kind(ckpt) == "checkpoint"


@needs_executorch
def test_pt2_with_device_cuda_says_it_runs_on_the_cpu(run, capsys):
    _, out, _ = run
    path = os.path.join(out, "model.pt2")
    assert open_model(path, device="cuda").device.type == "cpu"
    assert capsys.readouterr().err == (f"warning: --device cuda asked, but a .pt2 file runs on the CPU only; running "
                                       f"{path} on the CPU (for a GPU: the checkpoint, model.onnx or a TensorRT "
                                       "engine)\n")
    open_model(path)
    assert capsys.readouterr().err == ""


@needs_executorch
def test_predict_pte_prints_the_checkpoints_top1(run, tmp_path):
    ckpt, out, _ = run
    photo = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(os.path.dirname(ckpt), "..", "data",
                                                                          "val")) for f in fs)[:6]
    base = ["--topk", "1", "--workers", "0", "--no-progress"]
    top = {}
    for name in ("ckpt", "model.pte", "model.int8.pte", "model.pt2"):
        path = ckpt if name == "ckpt" else os.path.join(out, name)
        top[name] = [p["top"][0]["class"] for p in predict.main([path, *photo, *base])["predictions"]]
    assert top["model.pte"] == top["ckpt"] == top["model.pt2"]
    # the command line: one image, the checkpoint's top-1 printed, no runtime start-up noise on stderr
    done = subprocess.run([sys.executable, "predict.py", os.path.join(out, "model.pte"), photo[0], *base],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert top["ckpt"][0] in done.stdout and "engine: executorch" in done.stdout
    assert "cpuinfo" not in done.stderr


@needs_executorch
def test_evaluate_pte(run, tmp_path):
    import evaluate

    ckpt, out, report = run
    data = os.path.join(os.path.dirname(ckpt), "..", "data", "val")
    m = evaluate.main([os.path.join(out, "model.pte"), data, "--out", str(tmp_path / "ev"), "--workers", "0",
                       "--no-progress"])
    assert abs(m["top1"] - report["checks"]["executorch_int8"]["fp32_top1"]) < 0.01


@pytest.fixture(scope="module")
def pruned(run, tmp_path_factory):
    """The run's checkpoint with half of its expanded channels pruned, saved in the pruned checkpoint format."""
    ckpt = run[0]
    model = ex.load_export_source(ckpt).model
    prune_expanded_channels(model, 0.5, img_size=32)
    path = str(tmp_path_factory.mktemp("pruned") / "pruned.pt")
    save_checkpoint(path, {**pruned_state(load_checkpoint(ckpt), model, 0.0, ckpt, 0.5, 0), "arch": dict(model.arch)})
    return path


def test_missing_executorch_is_one_line_and_nothing_is_written(run, tmp_path, monkeypatch):
    ckpt = run[0]
    monkeypatch.setattr(etx, "executorch_problem", lambda: "ModuleNotFoundError: No module named 'executorch'")
    with pytest.raises(UserError) as e:
        export.main([ckpt, "--format", "onnx", "executorch_int8", "--out", str(tmp_path / "x")])
    assert "\n" not in str(e.value) and "No module named 'executorch'" in str(e.value)
    assert "pip install executorch==" in str(e.value) and "pt2 formats work without it" in str(e.value)
    assert not (tmp_path / "x").exists()
    args = argparse.Namespace(variants=None)
    assert bench_infer.resolve_variants(args) == [v for v in bench_infer.VARIANTS
                                                  if v not in bench_infer.EXECUTORCH_VARIANTS]


@needs_executorch
def test_broken_pte_is_a_user_error(run, tmp_path):
    _, out, _ = run
    data = open(os.path.join(out, "model.pte"), "rb").read()
    bad = tmp_path / "cut.pte"
    bad.write_bytes(data[:4096])
    assert detect_kind(str(bad)) == "pte"
    with pytest.raises(UserError, match="cannot load ExecuTorch program"):
        open_model(str(bad))


@needs_executorch
def test_bench_infer_executorch_row_of_a_pruned_checkpoint(run, pruned, tmp_path):
    """The .pte of the pruned model, written by export.py's writer, is smaller than the unpruned one. (export.py reads
    pruned checkpoints through the same loader for every format: tests/test_prune.py exports one to ONNX; the int8
    writer is the fixture's, its calibration images are tests/test_bench_infer.py's onnxruntime_int8 row's.)"""
    out = str(tmp_path / "infer.csv")
    p = argparse.ArgumentParser()
    bench_infer.add_arguments(p)
    rows = bench_infer.run(p.parse_args([
        pruned, "--repeats", "3", "--batch-repeats", "1", "--batch-size", "4", "--warmup", "1",
        "--out", out, "--variants", "onnxruntime", "executorch"]))
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["onnxruntime", "executorch"] and "pruned" in rows[0]["model"]
    assert all(r["b1_p50_ms"] > 0 and r["b4_img_s"] > 0 for r in rows)
    unpruned_mb = os.path.getsize(os.path.join(run[1], "model.pte")) / 1e6
    assert by["executorch"]["file_mb"] < 0.8 * unpruned_mb, (by["executorch"]["file_mb"], unpruned_mb)
    assert abs(by["executorch"]["file_mb"] - by["onnxruntime"]["file_mb"]) < 0.2 * by["onnxruntime"]["file_mb"]
    assert "| executorch |" in open(os.path.splitext(out)[0] + ".md").read()
