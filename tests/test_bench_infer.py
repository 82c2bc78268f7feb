"""benchmark.py infer: every variant built, timed and written (smoke test; speed itself is not asserted)."""
from __future__ import annotations

import argparse
import csv
import os

from utils.bench import data as bench_data
from utils.bench import infer as bench_infer
from utils.machine import describe_machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_EXECUTORCH = [v for v in bench_infer.VARIANTS if v not in bench_infer.EXECUTORCH_VARIANTS]


def _args(argv):
    p = argparse.ArgumentParser()
    bench_infer.add_arguments(p)
    return p.parse_args(argv)


def test_bench_infer_bare_architecture(tmp_path):
    out = str(tmp_path / "infer.csv")
    rows = bench_infer.run(_args(["--model", "mobilenet_v2", "--width-mult", "0.25", "--num-classes", "10",
                                  "--img-size", "32", "--repeats", "3", "--batch-repeats", "1",
                                  "--batch-size", "4", "--warmup", "1", "--calib-images", "4", "--out", out,
                                  "--variants", *NOT_EXECUTORCH]))  # ExecuTorch rows: tests/test_executorch.py
    assert [r["variant"] for r in rows] == NOT_EXECUTORCH
    with open(out) as f:
        saved = list(csv.DictReader(f))
    assert [r["variant"] for r in saved] == NOT_EXECUTORCH
    assert set(saved[0]) >= {"params", "macs", "file_mb", "b1_p50_ms", "b1_p90_ms", "b4_img_s", "load_avg", "machine"}
    assert {r["machine"] for r in saved} == {describe_machine("cpu")}  # names the CPU and its int8/bf16 features
    by = {r["variant"]: r for r in rows}
    assert all(r["b1_p50_ms"] > 0 and r["b1_p90_ms"] >= r["b1_p50_ms"] and r["b4_img_s"] > 0 for r in rows)
    assert by["onnxruntime_int8"]["file_mb"] < 0.5 * by["onnxruntime"]["file_mb"]
    md = open(os.path.splitext(out)[0] + ".md").read()
    assert "| onnxruntime_int8 |" in md and "int8 / fp32 onnxruntime" in md
    assert md.splitlines()[0] == f"machine: {describe_machine('cpu')}"


def test_bench_data_names_the_machine(tmp_path, capsys):
    p = argparse.ArgumentParser()
    bench_data.add_arguments(p)
    out = tmp_path / "data"
    bench_data.run(p.parse_args(["--images", "4", "--repeats", "1", "--workers", "0", "--out", str(out),
                                 "--fmnist", os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")]))
    line = f"machine: {describe_machine('cpu')}"
    assert line in capsys.readouterr().out.splitlines()
    assert (out / "data_bench.md").read_text().splitlines()[0] == line
    with open(out / "data_bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["machine"] for r in rows} == {describe_machine("cpu")}
    assert all(float(r["images_per_s"]) > 0 for r in rows)
