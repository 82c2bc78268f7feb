"""export.py on a tiny real checkpoint (Fashion-MNIST sample): files, metadata, parity, int8 gate, errors."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import export  # noqa: E402
from export_helpers import make_run  # noqa: E402
from utils import export as ex  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.runtime import open_model  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained checkpoint and one full export (onnx, torchscript, int8) of it."""
    ckpt = make_run(str(tmp_path_factory.mktemp("export")))
    report = export.main([ckpt, "--max-drop", "2.5"])  # 80 val images: 1 image = 1.25 points
    return ckpt, os.path.join(os.path.dirname(ckpt), "export"), report


def _val_batch(ckpt):
    c = torch.load(ckpt, weights_only=True)
    items = ex.list_labelled_images(os.path.join(c["config"]["data"], "val"), c["classes"])
    return ex.load_images([p for p, _ in items], c["preprocess"]), c


def test_files_and_report(run):
    ckpt, out, report = run
    for name in ("model.onnx", "model.torchscript.pt", "model.int8.onnx", "export.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if "unverified" in f or f.endswith(".tmp")]
    on_disk = json.load(open(os.path.join(out, "export.json")))
    assert on_disk["checks"] == json.loads(json.dumps(report["checks"]))
    for fmt in ("onnx", "torchscript"):
        chk = on_disk["checks"][fmt]
        assert chk["passed"] and chk["top1_agree"] == chk["images"] == 80
        assert chk["max_abs_diff"] <= 1e-4 * max(1.0, chk["logit_scale"])
    assert on_disk["checks"]["int8"]["val_images"] == 80


def test_onnx_graph_metadata_and_parity(run):
    ckpt, out, _ = run
    proto = onnx.load(os.path.join(out, "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Clip" in ops  # BN folded, ReLU6 -> Clip
    facts = ex.describe_onnx(proto)
    assert facts["clip_bounds_constant"] and facts["dynamic_batch"] and facts["opset"] == 17
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "logits"
    x, c = _val_batch(ckpt)
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["classes"] == c["classes"] and meta["preprocess"] == c["preprocess"]
    # independent check with a plain onnxruntime session, two batch sizes (dynamic axis)
    model = ex.load_export_source(ckpt).model
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ex.onnx_session(os.path.join(out, "model.onnx"))
    for n in (1, 7):
        got = sess.run(["logits"], {"input": x[:n].numpy()})[0]
        assert got.shape == (n, 10)
        assert np.abs(got - ref[:n]).max() <= 1e-4


def test_torchscript_frozen_with_extra_files(run):
    ckpt, out, _ = run
    extra = {"classes": "", "preprocess": ""}
    m = torch.jit.load(os.path.join(out, "model.torchscript.pt"), _extra_files=extra)
    x, c = _val_batch(ckpt)
    assert json.loads(extra["classes"]) == c["classes"] and json.loads(extra["preprocess"]) == c["preprocess"]
    assert not any("batch_norm" in str(n.kind()) for n in m.graph.nodes())  # frozen: BN folded into convs
    ref = ex.load_export_source(ckpt).model(x).detach()
    got = m(x)
    assert (got - ref).abs().max() <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))
    loaded = open_model(os.path.join(out, "model.torchscript.pt"))  # evaluate/predict read it too
    assert loaded.classes == c["classes"]


def test_int8_is_static_qdq_u8_activations_s8_per_channel_weights(run):
    ckpt, out, report = run
    proto = onnx.load(os.path.join(out, "model.int8.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "ConvInteger" not in ops
    inits = {i.name: i for i in proto.graph.initializer}
    q_types = {inits[n.input[2]].data_type for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types == {onnx.TensorProto.UINT8}  # activations u8
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_dq and all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1
                             for n in weight_dq)  # one scale per output channel
    # the stem conv and the first depthwise conv stay fp32 (float weights), every other conv is int8
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    float_w = [n.name for n in convs if n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]
    assert float_w == report["files"]["int8"]["fp32_layers"] and len(float_w) == 2
    assert "features.0" in float_w[0] and "features.1" in float_w[1]
    assert len(weight_dq) == len(convs) - 2
    assert {p.key for p in proto.metadata_props} >= {"classes", "preprocess"}
    assert os.path.getsize(os.path.join(out, "model.int8.onnx")) < 0.5 * os.path.getsize(os.path.join(out, "model.onnx"))
    chk = report["checks"]["int8"]
    assert chk["fp32_top1"] > 40  # a real model, well above 10% chance
    assert abs(chk["drop"] - (chk["fp32_top1"] - chk["int8_top1"])) < 0.01
    # the int8 accuracy figure is recomputable from the file
    x, c = _val_batch(ckpt)
    items = ex.list_labelled_images(os.path.join(c["config"]["data"], "val"), c["classes"])
    labels = torch.tensor([y for _, y in items])
    int8 = open_model(os.path.join(out, "model.int8.onnx"))
    assert abs(ex.top1_percent(int8.predict_batch(x), labels) - chk["int8_top1"]) < 0.01


def test_int8_refused_when_drop_exceeds_threshold(run, tmp_path):
    ckpt, _, _ = run
    out = str(tmp_path / "refuse")
    with pytest.raises(UserError, match=r"int8 model .* loses .* more than --max-drop -100"):
        export.main([ckpt, "--format", "int8", "--out", out, "--max-drop", "-100"])
    assert os.path.isfile(os.path.join(out, "model.onnx"))  # fp32 verified first
    assert not os.path.exists(os.path.join(out, "model.int8.onnx"))
    assert not [f for f in os.listdir(out) if "unverified" in f]


def test_parity_failure_is_a_user_error():
    ref = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    with pytest.raises(UserError, match="does not match the PyTorch model"):
        ex.verify_parity("onnx", "m.onnx", ref, ref + 4e-4, tol=1e-4)  # allowed: 1e-4 x largest |logit| 3
    with pytest.raises(UserError, match="same top-1 on 1/2"):
        ex.verify_parity("onnx", "m.onnx", ref, torch.tensor([[1.0, 2.0], [0.0, 3.0]]), tol=10.0)
    assert ex.verify_parity("onnx", "m.onnx", ref, ref + 2.5e-4, tol=1e-4)["passed"]
    small = ref / 10  # logits within +-1: the tolerance is absolute
    with pytest.raises(UserError):
        ex.verify_parity("onnx", "m.onnx", small, small + 1.5e-4, tol=1e-4)


def test_tensorrt_without_gpu_gives_trtexec_line(run, tmp_path):
    ckpt, _, _ = run
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match=r"export\.py .* --format onnx --out .*trt`, then trtexec --onnx=.*model\.onnx "
                                         r"--saveEngine=.*model\.engine --fp16"):
        export.main([ckpt, "--format", "tensorrt", "--out", str(tmp_path / "trt")])
    assert not (tmp_path / "trt").exists()  # nothing half-made is left behind


def test_missing_val_data_names_the_flag(run, tmp_path):
    ckpt, _, _ = run
    with pytest.raises(UserError, match="--val-data"):
        export.main([ckpt, "--format", "onnx", "--out", str(tmp_path / "x"), "--val-data", str(tmp_path / "nope")])
