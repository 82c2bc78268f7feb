"""open_model: checkpoint, TorchScript and ONNX give the same predictions on real photos; clear errors."""
import json
import os
import zipfile

import pytest
import torch
from eval_helpers import PREPROCESS, export_onnx, export_torchscript, make_checkpoint, photo_paths
from PIL import Image

from utils.data import build_eval_transform
from utils.deploy.runtime import detect_kind, open_model
from utils.errors import UserError

NAMES = [os.path.splitext(os.path.basename(p))[0] for p in photo_paths()]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    ckpt = make_checkpoint(str(d / "best.pt"), NAMES, [(p, i) for i, p in enumerate(photo_paths())])
    return {"checkpoint": ckpt, "torchscript": export_torchscript(ckpt, str(d / "model.torchscript.pt")),
            "onnx": export_onnx(ckpt, str(d / "model.onnx"))}


def test_three_formats_same_predictions_on_real_photos(model_files):
    x = None
    outputs = {}
    for kind, path in model_files.items():
        m = open_model(path)
        assert m.kind == kind == detect_kind(path)
        assert m.classes == NAMES
        assert m.preprocess == PREPROCESS
        if x is None:
            tf = build_eval_transform(m.preprocess)
            x = torch.stack([tf(Image.open(p)) for p in photo_paths()])
        logits = m.predict_batch(x)
        assert logits.shape == (12, 12) and logits.dtype == torch.float32 and logits.device.type == "cpu"
        outputs[kind] = logits
    ref = outputs["checkpoint"]
    # The fitted model tells the photos apart, so agreeing argmaxes is a real check (not 12 ties).
    assert len(set(ref.argmax(1).tolist())) >= 9
    for kind in ("torchscript", "onnx"):
        torch.testing.assert_close(outputs[kind], ref, atol=1e-4, rtol=1e-4)
        assert outputs[kind].argmax(1).tolist() == ref.argmax(1).tolist()
        assert outputs[kind].topk(5).indices.tolist() == ref.topk(5).indices.tolist()


def test_batch_size_does_not_change_results(model_files):
    m = open_model(model_files["onnx"])
    tf = build_eval_transform(m.preprocess)
    x = torch.stack([tf(Image.open(p)) for p in photo_paths()[:5]])
    one_by_one = torch.cat([m.predict_batch(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(one_by_one, m.predict_batch(x), atol=1e-5, rtol=1e-5)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"model file .*nope\.pt not found; pass a train\.py checkpoint"):
        open_model(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("kind", ["checkpoint", "torchscript", "onnx"])
def test_truncated_model_file(model_files, tmp_path, kind):
    data = open(model_files[kind], "rb").read()
    bad = tmp_path / os.path.basename(model_files[kind])
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError) as e:
        open_model(str(bad))
    msg = str(e.value)
    assert str(bad) in msg
    assert "not a valid checkpoint, TorchScript or ONNX file" in msg or "cannot read" in msg
    assert "checkpoint (.pt)" in msg and "ONNX file (.onnx)" in msg  # says what is accepted


def test_image_instead_of_model(tmp_path):
    with pytest.raises(UserError, match="not a valid checkpoint, TorchScript or ONNX file"):
        open_model(photo_paths()[0])


def test_folder_instead_of_model(tmp_path):
    with pytest.raises(UserError, match="is a folder; pass a model file inside it"):
        open_model(str(tmp_path))


def test_torchscript_without_metadata_is_explained(model_files, tmp_path):
    ts = torch.jit.load(model_files["torchscript"])
    bare = str(tmp_path / "bare.pt")
    torch.jit.save(ts, bare)  # no _extra_files
    with pytest.raises(UserError, match=r"bare\.pt carries no class names .*re-export it with export\.py"):
        open_model(bare)


def test_onnx_with_broken_metadata_is_explained(model_files, tmp_path):
    import onnx

    proto = onnx.load(model_files["onnx"])
    for p in proto.metadata_props:
        if p.key == "preprocess":
            p.value = json.dumps({"img_size": 32})
    bad = str(tmp_path / "bad_meta.onnx")
    onnx.save(proto, bad)
    with pytest.raises(UserError, match=r"bad_meta\.onnx carries no preprocessing .*resize_size"):
        open_model(bad)


def test_checkpoint_without_classes(tmp_path):
    ckpt = torch.load(make_checkpoint(str(tmp_path / "c.pt"), ["a", "b"]), weights_only=True)
    del ckpt["classes"]
    torch.save(ckpt, tmp_path / "noclasses.pt")
    assert zipfile.is_zipfile(tmp_path / "noclasses.pt")
    with pytest.raises(UserError, match="noclasses.pt carries no class names"):
        open_model(str(tmp_path / "noclasses.pt"))


# ----------------------------------------------------------------------- ONNX execution providers on a GPU box
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def fake_ort(monkeypatch, tmp_path):
    """install(available, runs) -> seen: onnxruntime claims ``available`` providers and sessions that report
    ``runs`` (what a GPU machine would say) while really running on the CPU; ``seen`` gets what was asked for."""
    import onnxruntime as ort

    real = ort.InferenceSession
    seen: dict = {}

    class Session(real):
        def __init__(self, path, sess_options=None, providers=None, **kw):
            seen["providers"] = [p if isinstance(p, tuple) else (p, {}) for p in providers]
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return list(seen["runs"])

    def install(available, runs):
        seen["runs"] = runs
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(available))
        monkeypatch.setattr(ort, "InferenceSession", Session)
        monkeypatch.setenv("MOBILENET_CACHE_DIR", str(tmp_path / "cache"))
        return seen
    return install


def test_onnx_on_cuda_1_asks_tensorrt_then_cuda_on_that_gpu(model_files, fake_ort, capsys, tmp_path):
    seen = fake_ort(GPU_PROVIDERS, GPU_PROVIDERS)
    m = open_model(model_files["onnx"], device="cuda:1")
    names = [name for name, _ in seen["providers"]]
    assert names == GPU_PROVIDERS  # TensorRT first, CPU last
    trt_opts, cuda_opts, _ = (opts for _, opts in seen["providers"])
    assert cuda_opts == {"device_id": 1}
    assert trt_opts["device_id"] == 1 and trt_opts["trt_fp16_enable"] is False and trt_opts["trt_engine_cache_enable"]
    assert trt_opts["trt_engine_cache_path"].startswith(str(tmp_path / "cache")) and os.path.isdir(
        trt_opts["trt_engine_cache_path"])
    assert str(m.device) == "cuda:1" and m.providers == GPU_PROVIDERS
    assert m.runs_on == "cuda:1 (TensorrtExecutionProvider)"
    assert m.describe().endswith("cuda:1 (TensorrtExecutionProvider)")
    assert capsys.readouterr().err == ""  # nothing fell back


def test_onnx_without_tensorrt_provider_asks_cuda_device_0(model_files, fake_ort, capsys):
    seen = fake_ort(GPU_PROVIDERS[1:], GPU_PROVIDERS[1:])
    m = open_model(model_files["onnx"], device="cuda")
    assert seen["providers"] == [("CUDAExecutionProvider", {"device_id": 0}), ("CPUExecutionProvider", {})]
    assert str(m.device) == "cuda:0" and capsys.readouterr().err == ""


def test_onnx_provider_fallback_is_reported_in_one_line(model_files, fake_ort, capsys):
    fake_ort(GPU_PROVIDERS, ["CPUExecutionProvider"])  # e.g. CUDA libraries missing: onnxruntime drops to CPU
    m = open_model(model_files["onnx"], device="cuda:0")
    err = capsys.readouterr().err
    assert err == (f"warning: onnxruntime did not start TensorrtExecutionProvider, CUDAExecutionProvider for "
                   f"{model_files['onnx']}; running on CPUExecutionProvider\n")
    assert m.device.type == "cpu" and m.providers == ["CPUExecutionProvider"]
    assert m.runs_on == "cpu (CPUExecutionProvider)"


def test_onnx_cuda_asked_but_onnxruntime_is_cpu_only(model_files, fake_ort, capsys):
    seen = fake_ort(["CPUExecutionProvider"], ["CPUExecutionProvider"])
    m = open_model(model_files["onnx"], device="cuda")
    assert [name for name, _ in seen["providers"]] == ["CPUExecutionProvider"]
    err = capsys.readouterr().err
    assert err.startswith("warning: --device cuda asked, but this onnxruntime has no CUDA or TensorRT provider "
                          "(available: CPUExecutionProvider); running ") and err.count("\n") == 1
    assert "onnxruntime-gpu" in err and m.device.type == "cpu"


def test_onnx_on_cpu_asks_only_the_cpu_provider(model_files, fake_ort, capsys):
    seen = fake_ort(GPU_PROVIDERS, ["CPUExecutionProvider"])
    m = open_model(model_files["onnx"], device="cpu")
    assert seen["providers"] == [("CPUExecutionProvider", {})]
    assert m.device.type == "cpu" and capsys.readouterr().err == ""
