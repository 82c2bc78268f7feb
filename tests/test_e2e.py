"""The user's path end to end through the real command-line entry points, on the committed real sample:
split_dataset.py -> train.py -> evaluate.py -> export.py -> predict.py (tiny settings)."""
import csv
import json
import os
import subprocess
import sys

import pytest
from cli_helpers import run_together

pytestmark = [pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")


def run(*args, cwd=ROOT):
    """Run a repository script like a user would; fail with its output when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, f"{args[0]} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p.stdout


def test_split_train_evaluate_export_predict(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "run"
    out = run("split_dataset.py", SAMPLE, str(data), "--val", "0.25", "--seed", "0", "--no-progress")
    assert "total" in out
    with open(data / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and {r["split"] for r in rows} == {"train", "val"}

    run("train.py", "--data", str(data), "--out", str(runs), "--model", "mobilenet_v2", "--width-mult", "0.25",
        "--img-size", "32", "--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--workers", "0",
        "--set", "resize_size=32", "--set", "progress=false")
    for name in ("config.yaml", "log.csv", "curves.png", "last.pt", "best.pt"):
        assert (runs / name).is_file(), name
    with open(runs / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in log] == [1, 2]

    run("evaluate.py", str(runs / "best.pt"), str(data / "val"), "--workers", "0", "--no-progress")
    metrics = json.loads((runs / "eval" / "metrics.json").read_text())
    best = max(log, key=lambda r: float(r["val_top1"]))
    # evaluate.py on best.pt reproduces the validation top-1 train.py logged for that epoch (same 50 images).
    assert abs(metrics["top1"] - float(best["val_top1"])) < 1e-6
    for name in ("per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "mistakes.csv"):
        assert (runs / "eval" / name).is_file(), name

    # A 2-epoch toy model's int8 accuracy and agreement are noise, so both gates are opened here (tested elsewhere).
    run("export.py", str(runs / "best.pt"), "--format", "onnx", "torchscript", "int8", "--max-drop", "100",
        "--min-agreement", "0", "--calib-images", "40")
    export_dir = runs / "export"
    for name in ("model.onnx", "model.torchscript.pt", "model.int8.onnx", "export.json"):
        assert (export_dir / name).is_file(), name

    images = sorted(str(p) for p in (data / "val").rglob("*.png"))[:6]
    formats = ("best.pt", "export/model.onnx", "export/model.torchscript.pt")
    jsons = {f: tmp_path / (f.replace("/", "_") + ".json") for f in formats}
    for p in run_together([["predict.py", str(runs / f), *images, "--topk", "3", "--json", str(jsons[f]), "--workers",
                            "0", "--no-progress"] for f in formats]):  # side by side: independent commands
        assert p.returncode == 0, f"{p.args[1:3]} exited {p.returncode}\nstderr:\n{p.stderr[-3000:]}"
    preds = {f: json.loads(jsons[f].read_text()) for f in formats}
    # The three formats of the same weights give the same ranking on every image, probabilities within 1e-4.
    ref = preds["best.pt"]["predictions"]
    assert [p["file"] for p in ref] == images
    for other in ("export/model.onnx", "export/model.torchscript.pt"):
        got = preds[other]["predictions"]
        assert [[t["class"] for t in p["top"]] for p in got] == [[t["class"] for t in p["top"]] for p in ref]
        assert max(abs(a["prob"] - b["prob"]) for p, q in zip(got, ref) for a, b in zip(p["top"], q["top"])) < 1e-4
