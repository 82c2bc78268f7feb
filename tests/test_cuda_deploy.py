"""GPU only: export a small model fitted on the committed Fashion-MNIST sample to a real TensorRT engine,
then evaluate and predict with it. Skipped unless the tensorrt package, a GPU TensorRT can initialise and a
CUDA memory API (torch with CUDA, or cuda-python) are all present. On a Jetson or GPU machine:

    python -m pytest -q -m cuda tests/test_cuda_deploy.py

tests/test_tensorrt.py covers the same code on CPU against fake TensorRT modules.
"""
from __future__ import annotations

import json
import os

import pytest

trt = pytest.importorskip("tensorrt")
pytestmark = pytest.mark.cuda

from eval_helpers import fitted_sample_run  # noqa: E402

import evaluate  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402
from utils.deploy import tensorrt_engine as te  # noqa: E402
from utils.deploy.runtime import open_model  # noqa: E402


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A checkpoint fitted on 12 real images per class, exported to model.onnx + model.engine (verified)."""
    problem = te.gpu_problem(trt) or te.cuda_memory_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("cuda_deploy")
    data, ckpt = fitted_sample_run(str(root), n_train=12, n_val=8, steps=60)
    out = str(root / "export")
    report = export.main([ckpt, "--format", "tensorrt", "--out", out])
    return {"ckpt": ckpt, "val": os.path.join(data, "val"), "out": out, "report": report, "root": root}


def test_engine_is_verified_with_its_sidecar(deployed):
    engine = os.path.join(deployed["out"], "model.engine")
    check = deployed["report"]["checks"]["tensorrt"]
    assert check["passed"] and check["images"] == 80 and check["max_abs_diff"] <= check["allowed"]
    side = json.load(open(engine + ".json"))
    assert side["tensorrt"] == trt.__version__ and side["precision"] in ("fp16", "fp32")
    assert not [f for f in os.listdir(deployed["out"]) if "unverified" in f]


def test_evaluate_and_predict_run_the_engine(deployed):
    engine = os.path.join(deployed["out"], "model.engine")
    ref = evaluate.main([deployed["ckpt"], deployed["val"], "--device", "cpu", "--no-progress",
                         "--out", str(deployed["root"] / "eval_ckpt")])
    got = evaluate.main([engine, deployed["val"], "--no-progress", "--out", str(deployed["root"] / "eval_engine")])
    assert got["kind"] == "engine" and got["device"] == "cuda" and got["images"] == ref["images"] == 80
    # fp16 may only swap near-ties (export.py checked that); allow that many images to differ
    ties = deployed["report"]["checks"]["tensorrt"]["near_ties"]
    assert abs(got["top1"] - ref["top1"]) <= 100.0 * ties / 80 + 1e-9
    res = predict.main([engine, deployed["val"], "--topk", "3", "--no-progress"])
    assert len(res["predictions"]) == 80 and all(len(p["top"]) == 3 for p in res["predictions"])


def test_onnx_reports_the_provider_that_ran(deployed):
    m = open_model(os.path.join(deployed["out"], "model.onnx"), device="cuda:0")
    assert m.providers and m.runs_on.startswith(m.device.type)
    if m.providers[0] == "CPUExecutionProvider":
        pytest.skip("this onnxruntime has no working GPU provider (the fallback was reported above)")
    assert m.device.type == "cuda"
