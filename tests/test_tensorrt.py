"""TensorRT export and engine runtime on CPU, against fake TensorRT 8.2/8.6/10/11 modules (tests/fake_tensorrt.py).

What is real here: the checkpoint (fitted on the committed Fashion-MNIST sample), the verified ONNX file, the
fp16 ONNX conversion used for TensorRT 11 (run by onnxruntime), every check export.py makes, the sidecar and
the runner's memory plumbing. What is faked: TensorRT itself and CUDA memory (host memory behind fake pointers).
tests/test_cuda_deploy.py does the same with the real thing on a GPU machine.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch
from eval_helpers import fitted_sample_run  # noqa: E402
from fake_tensorrt import make_cudart, make_plan, make_tensorrt  # noqa: E402

import evaluate  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402
from utils.deploy import export as ex
from utils.deploy import tensorrt_engine as te  # noqa: E402
from utils.deploy.onnx_io import onnx_session  # noqa: E402
from utils.deploy.runtime import detect_kind, open_model  # noqa: E402
from utils.errors import UserError  # noqa: E402

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small checkpoint fitted on real Fashion-MNIST images, its data split and a verified model.onnx."""
    root = tmp_path_factory.mktemp("trt")
    data, ckpt = fitted_sample_run(str(root), n_train=4, n_val=4, steps=30)
    classes = sorted(os.listdir(os.path.join(data, "train")))
    onnx_dir = str(root / "onnx")
    export.main([ckpt, "--format", "onnx", "--out", onnx_dir])
    return {"ckpt": ckpt, "data": data, "classes": classes, "onnx": os.path.join(onnx_dir, "model.onnx")}


@pytest.fixture
def fake_gpu(monkeypatch):
    """install(generation, **fake options) -> calls: a fake tensorrt + cuda-python, torch kept CPU-only."""
    def install(generation: str = "10", **kw) -> list:
        calls: list = []
        monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(generation, calls, **kw))
        monkeypatch.setattr(te, "_import_cudart", lambda: make_cudart(calls))
        # fake device pointers are host addresses: never hand them to a real GPU through torch
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return calls
    return install


def _recorded(calls: list, what: str) -> list:
    return [detail for name, detail in calls if name == what]


def _leftovers(folder: str) -> list[str]:
    return [f for f in os.listdir(folder) if "unverified" in f or f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- building
@pytest.mark.parametrize("generation, flags, fp16_flag, weights, precision", [
    ("8.6", 1 << 0, ["FP16"], [FLOAT], "fp16"),   # EXPLICIT_BATCH (value 0) or the ONNX parser refuses
    ("10", 0, ["FP16"], [FLOAT], "fp16"),         # explicit batch only; EXPLICIT_BATCH is an ignored name
    ("11", 0, [], [FLOAT16], "fp16"),             # no FP16 flag: fp16 comes from an fp16 ONNX copy
])
def test_each_generation_builds_with_its_own_flags(run, fake_gpu, tmp_path, generation, flags, fp16_flag, weights,
                                                   precision):
    calls = fake_gpu(generation)
    out = str(tmp_path / "export")
    report = export.main([run["ckpt"], "--format", "tensorrt", "--out", out])

    assert _recorded(calls, "create_network") == [flags]
    assert _recorded(calls, "set_flag") == fp16_flag
    parsed = _recorded(calls, "parse")
    assert [p["conv_weight_types"] for p in parsed] == [weights]
    assert parsed[0]["input_type"] == parsed[0]["output_type"] == FLOAT  # fp32 in and out on every generation
    assert _recorded(calls, "set_shape") == [("input", (1, 3, 32, 32), (1, 3, 32, 32), (32, 3, 32, 32))]

    engine = os.path.join(out, "model.engine")
    facts = report["files"]["tensorrt"]
    assert facts["precision"] == precision and facts["network_flags"] == (["EXPLICIT_BATCH"] if flags else [])
    assert facts["tensorrt"] == sys.modules["tensorrt"].__version__ == report["versions"]["tensorrt"]
    assert facts["equivalent"].startswith(f"trtexec --onnx={os.path.join(out, 'model.onnx')} --saveEngine={engine} ")
    check = report["checks"]["tensorrt"]
    assert check["passed"] and check["images"] == 40 and check["tolerance"] == 5e-2
    assert check["max_abs_diff"] <= check["allowed"]
    if generation == "11":  # a real fp16 graph run by onnxruntime: rounding is visible but within tolerance
        assert check["max_abs_diff"] > 1e-3 * check["logit_scale"]
    else:  # the fake ignores the FP16 flag and runs the fp32 graph: fp32 parity
        assert check["max_abs_diff"] <= 1e-4 * check["logit_scale"]
    assert _recorded(calls, "execute") == [32, 8]  # 40 images in chunks of the profile's max batch
    on_disk = json.load(open(os.path.join(out, "export.json")))
    assert on_disk["checks"]["tensorrt"]["passed"] and on_disk["files"]["tensorrt"]["path"] == engine

    side = json.load(open(engine + ".json"))
    assert side["classes"] == run["classes"] and side["preprocess"] == torch.load(run["ckpt"])["preprocess"]
    assert side["input"] == "input" and side["output"] == "logits" and side["max_batch"] == 32
    assert side["precision"] == precision and side["tensorrt"] == facts["tensorrt"]
    assert _leftovers(out) == []


def test_gpu_without_fast_fp16_gets_an_fp32_engine(run, fake_gpu, tmp_path):
    calls = fake_gpu("8.6", fast_fp16=False)
    facts = ex.build_tensorrt_engine(run["onnx"], str(tmp_path / "m.engine"), 32, run["classes"], {})
    assert facts["precision"] == "fp32" and "no fast fp16" in facts["precision_source"]
    assert _recorded(calls, "set_flag") == [] and _recorded(calls, "create_network") == [1]


def test_tensorrt_11_without_the_fp16_converter_falls_back_to_fp32(run, fake_gpu, tmp_path, monkeypatch):
    calls = fake_gpu("11")
    monkeypatch.setitem(sys.modules, te.FP16_CONVERTER, None)  # importing it now raises ImportError
    facts = ex.build_tensorrt_engine(run["onnx"], str(tmp_path / "m.engine"), 32, run["classes"], {})
    assert facts["precision"] == "fp32" and te.FP16_CONVERTER in facts["precision_source"]
    assert [p["conv_weight_types"] for p in _recorded(calls, "parse")] == [[FLOAT]]


def test_fp16_onnx_copy_is_valid_and_close_to_fp32(run, tmp_path):
    half = str(tmp_path / "half.onnx")
    te.convert_onnx_fp16(run["onnx"], half)
    onnx.checker.check_model(onnx.load(half), full_check=True)  # nodes sorted: the converter's Casts come first
    x = ex.load_images([os.path.join(run["data"], "val", c, f) for c in run["classes"][:3]
                        for f in sorted(os.listdir(os.path.join(run["data"], "val", c)))],
                       torch.load(run["ckpt"])["preprocess"]).numpy()
    a = onnx_session(run["onnx"]).run(None, {"input": x})[0]
    b = onnx_session(half).run(None, {"input": x})[0]
    assert b.dtype == np.float32
    assert 0 < np.abs(a - b).max() <= 5e-2 * max(1.0, np.abs(a).max())  # within export.py's --tol-fp16


# -------------------------------------------------------------------------------------- refusals
def test_no_gpu_is_one_line_naming_the_fix(run, fake_gpu, tmp_path):
    fake_gpu("10", gpu=False)
    out = tmp_path / "export"
    with pytest.raises(UserError) as e:
        export.main([run["ckpt"], "--format", "tensorrt", "--out", str(out)])
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("the tensorrt format needs a CUDA GPU and TensorRT 10.3.0 cannot initialise a CUDA GPU "
                          "(pybind11::init(): factory function returned nullptr); on a GPU machine run: ")
    assert "trtexec --onnx=" in msg and "--format onnx --out" in msg
    assert not out.exists()  # refused before any work


def test_no_cuda_memory_api_is_named(run, fake_gpu, tmp_path, monkeypatch):
    fake_gpu("10")
    monkeypatch.setattr(te, "_import_cudart", lambda: None)
    out = tmp_path / "export"
    with pytest.raises(UserError, match=r"checks the engine on real images, and running a TensorRT engine needs CUDA "
                                        r"memory from torch \(this torch has no CUDA\) or from cuda-python, which is "
                                        r"not installed: `pip install cuda-python`$"):
        export.main([run["ckpt"], "--format", "tensorrt", "--out", str(out)])
    assert not out.exists()


def test_wrong_engine_is_refused_and_nothing_is_published(run, fake_gpu, tmp_path):
    fake_gpu("10", corrupt=lambda y: y[:, ::-1])  # classes in reverse order: a broken engine
    out = str(tmp_path / "export")
    with pytest.raises(UserError, match=r"tensorrt export .*model\.engine does not match the PyTorch model: .*"
                                        r"--tol-fp16 0\.05 .*nothing was written under that name; .*TensorRT version"):
        export.main([run["ckpt"], "--format", "tensorrt", "--out", out])
    assert os.path.isfile(os.path.join(out, "model.onnx"))  # verified first and kept
    assert not os.path.exists(os.path.join(out, "model.engine"))
    assert not os.path.exists(os.path.join(out, "model.engine.json"))
    assert _leftovers(out) == []
    assert "tensorrt" not in json.load(open(os.path.join(out, "export.json")))["files"]


def test_fp16_parity_tolerates_only_near_ties():
    ref = torch.tensor([[5.0, 4.99, 0.0], [5.0, 1.0, 0.0]])
    swapped = torch.tensor([[4.99, 5.0, 0.0], [5.0, 1.0, 0.0]])  # a near-tie flips; differences 0.01
    with pytest.raises(UserError, match="same top-1 on 1/2"):
        ex.verify_parity("onnx", "m.onnx", ref, swapped, tol=2e-2)  # fp32 rule: every top-1 must agree
    r = ex.verify_parity("tensorrt", "m.engine", ref, swapped, tol=2e-2, near_ties=True)
    assert r["passed"] and r["near_ties"] == 1 and r["top1_agree"] == 1
    clear_flip = torch.tensor([[5.0, 4.99, 0.0], [1.0, 5.0, 0.0]])  # a decisive image flips: differences of 4
    with pytest.raises(UserError, match=r"max abs logit difference 4 \(allowed 0\.1 = --tol-fp16 0\.02 x largest "
                                        r"\|logit\| 5\), same top-1 on 1/2 images \(1 near-ties may differ\)"):
        ex.verify_parity("tensorrt", "m.engine", ref, clear_flip, tol=2e-2, near_ties=True, flag="--tol-fp16")


# --------------------------------------------------------------------------------- running engines
@pytest.mark.parametrize("generation", ["8.2", "10"])  # bindings API (8.0-8.4) and named tensors (8.5+)
def test_engine_runs_in_evaluate_and_predict_like_the_onnx_file(run, fake_gpu, tmp_path, generation):
    calls = fake_gpu(generation)
    out = str(tmp_path / "export")
    export.main([run["ckpt"], "--format", "tensorrt", "--out", out])
    engine = os.path.join(out, "model.engine")
    m = open_model(engine)
    assert m.kind == detect_kind(engine) == "engine" and str(m.device) == "cuda:0"
    assert m.classes == run["classes"] and m.preprocess == torch.load(run["ckpt"])["preprocess"]
    assert ("cudaSetDevice", 0) in calls

    onnx_metrics = evaluate.evaluate(open_model(run["onnx"]), os.path.join(run["data"], "val"), workers=0,
                                     progress=False)["metrics"]
    del calls[:]
    metrics = evaluate.main([engine, os.path.join(run["data"], "val"), "--workers", "0", "--no-progress",
                             "--batch-size", "64", "--out", str(tmp_path / "eval_engine")])
    assert metrics["kind"] == "engine" and metrics["runs_on"] == "cuda:0" and metrics["images"] == 40
    assert metrics["top1"] == onnx_metrics["top1"] and abs(metrics["loss"] - onnx_metrics["loss"]) < 1e-5
    assert _recorded(calls, "execute") == [32, 8]  # a batch of 64 split to the engine's max batch 32
    copies = _recorded(calls, "cudaMemcpyAsync")
    assert copies.count("cudaMemcpyHostToDevice") == copies.count("cudaMemcpyDeviceToHost") == 2

    photos = [os.path.join(run["data"], "val", c) for c in run["classes"][:2]]
    res = predict.main([engine, *photos, "--topk", "2", "--workers", "0", "--no-progress"])
    ref = predict.predict_files(open_model(run["onnx"]), [p for d in photos for p in sorted(
        os.path.join(d, f) for f in os.listdir(d))], topk=2, workers=0, progress=False)
    assert len(res["predictions"]) == 8
    assert [p["top"][0]["class"] for p in res["predictions"]] == [p["top"][0]["class"] for p in ref["predictions"]]


def test_plan_extension_is_an_engine_too(tmp_path):
    p = tmp_path / "model.plan"
    p.write_bytes(b"\x00" * 16)
    assert detect_kind(str(p)) == "engine"


@pytest.fixture
def fake_engine_file(run, tmp_path):
    """An engine + sidecar written by te.write_engine (no export needed)."""
    path = str(tmp_path / "model.engine")
    meta = {"classes": run["classes"], "preprocess": torch.load(run["ckpt"])["preprocess"], "input": "input",
            "output": "logits", "max_batch": 32, "tensorrt": "10.3.0"}
    te.write_engine(path, make_plan(open(run["onnx"], "rb").read(), max_batch=32), meta)
    return path


def test_sidecar_round_trip(run, fake_engine_file, fake_gpu):
    calls = fake_gpu("10")
    plan, meta = te.read_engine(fake_engine_file)
    assert plan.startswith(b"FAKEPLAN") and meta["max_batch"] == 32 and len(meta["engine_sha256"]) == 64
    m = open_model(fake_engine_file, device="cuda:1")
    assert str(m.device) == "cuda:1" and ("cudaSetDevice", 1) in calls
    assert m.classes == run["classes"] and m.preprocess == meta["preprocess"]
    val = os.path.join(run["data"], "val")
    x = ex.load_images([os.path.join(val, c, sorted(os.listdir(os.path.join(val, c)))[0]) for c in run["classes"]],
                       m.preprocess)
    ref = onnx_session(run["onnx"]).run(None, {"input": x.numpy()})[0]
    got = m.predict_batch(x)
    assert got.dtype == torch.float32 and got.shape == (10, 10)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)


def test_engine_without_sidecar(fake_engine_file):
    os.remove(fake_engine_file + ".json")
    with pytest.raises(UserError, match=r"model\.engine has no sidecar model\.engine\.json next to it .*re-export"):
        open_model(fake_engine_file)


def test_sidecar_of_another_engine_is_caught(fake_engine_file):
    with open(fake_engine_file, "ab") as f:
        f.write(b"rebuilt")
    with pytest.raises(UserError, match=r"model\.engine\.json describes a different engine than .*model\.engine"):
        open_model(fake_engine_file)


def test_sidecar_without_classes_is_explained(fake_engine_file):
    meta = json.load(open(fake_engine_file + ".json"))
    del meta["classes"]
    json.dump(meta, open(fake_engine_file + ".json", "w"))
    with pytest.raises(UserError, match=r"model\.engine\.json carries no class names"):
        open_model(fake_engine_file)


def test_engine_needs_tensorrt_and_a_gpu_device(fake_engine_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    with pytest.raises(UserError, match=r"is a TensorRT engine: running it needs NVIDIA TensorRT 10\.3\.0 .*model\.onnx"):
        open_model(fake_engine_file)
    with pytest.raises(UserError, match=r"runs only on a CUDA GPU, not on --device cpu"):
        open_model(fake_engine_file, device="cpu")


def test_engine_from_another_tensorrt_is_explained(fake_engine_file, fake_gpu):
    fake_gpu("10")
    with open(fake_engine_file, "wb") as f:
        f.write(b"not a plan of this TensorRT")
    meta = json.load(open(fake_engine_file + ".json"))
    meta.pop("engine_sha256")
    json.dump(meta, open(fake_engine_file + ".json", "w"))
    with pytest.raises(UserError, match=r"TensorRT 10\.3\.0 cannot load .*model\.engine \(built with TensorRT 10\.3\.0; "
                                        r"an engine runs only on the TensorRT version and GPU model that built it\)"):
        open_model(fake_engine_file)
