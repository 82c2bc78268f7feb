"""The README's `classify_onnx.py` (ONNX with numpy, pillow and onnxruntime only) prints what predict.py prints:
the same top class, calibrated probabilities (the stored temperature applied) within 0.01 (PIL's resize rounds a
few pixels one level away from torchvision's) and the same `unknown` answer.

The model is the ImageNet MobileNetV2 at the shipped 224 px preprocessing on real ImageNet photos, as a user's
exported file is: a briefly fitted toy model at 32 px turned those one-level pixel differences into up to 0.27 logits
(2.8 probability points) on one CPU and not on another, so it measured the toy, not the README's claim."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision
from eval_helpers import export_onnx, photo_paths
from PIL import Image

import predict
from models import build_model, load_pretrained
from utils.checkpoint import save_checkpoint
from utils.data import IMAGENET_MEAN, IMAGENET_STD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread


def readme_snippet() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    after = text.split("(saved as `classify_onnx.py`):", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def imagenet_checkpoint(path: str, squash: bool = False) -> str:
    """The pretrained ImageNet MobileNetV2 with its 1000 class names, saved as train.py saves a checkpoint
    (``squash``: with the preprocessing train.py picks for a folder of tall or wide images)."""
    model = build_model("mobilenet_v2", num_classes=1000)
    load_pretrained(model, "imagenet")
    classes = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": None, "scheduler": None, "scaler": None, "ema": None,
        "epoch": 1, "step": 0, "best_acc": 0.0, "config": {}, "classes": list(classes),
        "preprocess": {"img_size": 224, "resize_size": 256, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       **({"resize_mode": "squash"} if squash else {})},
        "arch": dict(model.arch), "rng": {}, "versions": {"torch": str(torch.__version__)},
    })
    return path


def test_readme_onnx_snippet_prints_predict_py_calibrated_probabilities(tmp_path):
    import onnx

    model = export_onnx(imagenet_checkpoint(str(tmp_path / "best.pt")), str(tmp_path / "model.onnx"))
    proto = onnx.load(model)
    entry = proto.metadata_props.add()  # as export.py stores it (utils.checkpoint.model_metadata)
    entry.key, entry.value = "calibration", json.dumps({"temperature": 2.5, "threshold": 0.5})
    onnx.save(proto, model)
    script = tmp_path / "classify_onnx.py"
    script.write_text(readme_snippet())
    # The shipped photos are 256 x 256, the resize size itself: copies at other sizes and shapes (landscape,
    # portrait) make both scripts really resize, where PIL's and torchvision's rounding can part.
    answers = set()
    for photo, size in zip(photo_paths(), [(400, 300), (300, 460), (640, 480), (333, 517)] * 3):
        copy = str(tmp_path / (os.path.splitext(os.path.basename(photo))[0] + ".png"))
        Image.open(photo).convert("RGB").resize(size, Image.LANCZOS).save(copy)
        photo = copy
        out = subprocess.run([sys.executable, str(script), model, photo], capture_output=True, text=True,
                             timeout=120, check=True).stdout.splitlines()
        got = [(c, float(q)) for c, q in (line.rsplit(None, 1) for line in out[:3])]
        pred = predict.main([model, photo, "--no-progress", "--workers", "0", "--topk", "3", "--threshold", "auto"])
        p = pred["predictions"][0]
        assert pred["temperature"] == 2.5
        want = {t["class"]: t["prob"] for t in p["top"]}
        assert all(abs(q - want.get(c, q + 1)) < 0.01 for c, q in got[:2]), (photo, got, want)
        if p["top"][0]["prob"] - p["top"][1]["prob"] > 0.02:  # a near tie may swap
            assert got[0][0] == p["top"][0]["class"], photo
        if abs(p["top"][0]["prob"] - 0.5) > 0.01:  # not on the threshold's edge
            assert (len(out) == 4 and out[3].startswith("unknown")) == (p["answer"] == "unknown"), photo
        answers.add(p["answer"] == "unknown")
    assert answers == {True, False}  # both answers were compared


def test_readme_onnx_snippet_squashes_like_predict_py_for_a_squash_model(tmp_path):
    """A model trained on tall or wide images (resize_mode squash) reads the whole image squashed: the snippet
    prints predict.py's probabilities, which differ from those of the same network read with a center crop."""
    squash = export_onnx(imagenet_checkpoint(str(tmp_path / "squash.pt"), squash=True), str(tmp_path / "squash.onnx"))
    crop = export_onnx(imagenet_checkpoint(str(tmp_path / "crop.pt")), str(tmp_path / "crop.onnx"))
    script = tmp_path / "classify_onnx.py"
    script.write_text(readme_snippet())
    apart = 0.0
    for photo, size in zip(photo_paths()[:4], [(150, 450), (540, 180), (120, 400), (600, 200)]):
        copy = str(tmp_path / (os.path.splitext(os.path.basename(photo))[0] + ".png"))
        Image.open(photo).convert("RGB").resize(size, Image.LANCZOS).save(copy)
        out = subprocess.run([sys.executable, str(script), squash, copy], capture_output=True, text=True,
                             timeout=120, check=True).stdout.splitlines()
        got = [(c, float(q)) for c, q in (line.rsplit(None, 1) for line in out[:3])]
        top = {}
        for name, model in (("squash", squash), ("crop", crop)):
            pred = predict.main([model, copy, "--no-progress", "--workers", "0", "--topk", "3"])
            top[name] = {t["class"]: t["prob"] for t in pred["predictions"][0]["top"]}
        assert all(abs(q - top["squash"].get(c, q + 1)) < 0.01 for c, q in got[:2]), (copy, got, top)
        apart = max(apart, *(abs(top["squash"].get(c, 0.0) - top["crop"].get(c, 0.0)) for c in {*top["squash"], *top["crop"]}))
    assert apart > 0.1, apart  # the two readings of these 3:1 photos differ: the match above means squash
