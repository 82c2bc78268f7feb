"""The README's `classify_onnx.py` (ONNX with numpy, pillow and onnxruntime only) prints what predict.py prints:
the same top class, calibrated probabilities (the stored temperature applied) within 0.01 (PIL's JPEG decoder and
resize differ from torchvision's in the last bits) and the same `unknown` answer."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from eval_helpers import export_onnx, make_checkpoint, photo_paths

import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread


def readme_snippet() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    after = text.split("(saved as `classify_onnx.py`):", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_onnx_snippet_prints_predict_py_calibrated_probabilities(tmp_path):
    import onnx

    names = [os.path.splitext(os.path.basename(p))[0] for p in photo_paths()]
    ckpt = make_checkpoint(str(tmp_path / "best.pt"), names, [(p, i) for i, p in enumerate(photo_paths())])
    model = export_onnx(ckpt, str(tmp_path / "model.onnx"))
    proto = onnx.load(model)
    entry = proto.metadata_props.add()  # as export.py stores it (utils.checkpoint.model_metadata)
    entry.key, entry.value = "calibration", json.dumps({"temperature": 2.5, "threshold": 0.5})
    onnx.save(proto, model)
    script = tmp_path / "classify_onnx.py"
    script.write_text(readme_snippet())
    answers = set()
    for photo in photo_paths():
        out = subprocess.run([sys.executable, str(script), model, photo], capture_output=True, text=True,
                             timeout=120, check=True).stdout.splitlines()
        got = [(c, float(q)) for c, q in (line.rsplit(None, 1) for line in out[:3])]
        pred = predict.main([model, photo, "--no-progress", "--workers", "0", "--topk", "3", "--threshold", "auto"])
        p = pred["predictions"][0]
        assert pred["temperature"] == 2.5
        want = {t["class"]: t["prob"] for t in p["top"]}
        assert all(abs(q - want.get(c, q + 1)) < 0.01 for c, q in got[:2]), (photo, got, want)
        if p["top"][0]["prob"] - p["top"][1]["prob"] > 0.02:  # a near tie may swap (this test model is weak)
            assert got[0][0] == p["top"][0]["class"], photo
        if abs(p["top"][0]["prob"] - 0.5) > 0.01:  # not on the threshold's edge
            assert (len(out) == 4 and out[3].startswith("unknown")) == (p["answer"] == "unknown"), photo
        answers.add(p["answer"] == "unknown")
    assert answers == {True, False}  # both answers were compared
