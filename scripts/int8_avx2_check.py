#!/usr/bin/env python
"""Top-1 of ONNX files as an AVX2-only CPU (no VNNI) computes it, on any x86 machine: onnxruntime under QEMU.

onnxruntime picks its int8 kernels from CPUID. Run under ``qemu-x86_64 -cpu Haswell`` (user-mode emulation: AVX2,
no AVX-512, no VNNI) it takes the AVX2 u8 x s8 path, whose int16 pair sums (vpmaddubsw) saturate with 8-bit
weights, exactly as on an AMD Zen 2 or a pre-Cascade-Lake Intel CPU. Speed under emulation means nothing;
the logits are bit-for-bit what that CPU's kernels produce.

    apt-get install qemu-user           # provides qemu-x86_64
    python scripts/int8_avx2_check.py RUN/export/model.onnx RUN/export/model.int8.onnx --val-data DATA/val
    python scripts/int8_avx2_check.py a.int8.onnx b.int8.onnx --val-data DATA/val --images 300 --cpu Haswell

For each file: quantized weight range, top-1 here (native) and emulated; for int8 files also emulated with
onnxruntime's session option ``session.x64quantprecision=1`` (u8 x u8 kernels: exact, slower). First a probe
proves the emulated CPU saturates (255 x 127 products) and this one does not. Emulation costs ~35 ms per
48 px image for an int8 MobileNetV2 0.5 (2,000 images: ~75 s per file; fp32 is slower to emulate).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from utils.errors import UserError, run_main  # no torch: the worker runs under emulation (needs `pip install -e .`)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------- worker (runs under qemu: numpy + onnxruntime)
def _probe() -> str:
    """u8 255 x s8 127 summed over 64 terms with MatMulInteger: 'exact' or 'saturates' on this (emulated) CPU."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    w = numpy_helper.from_array(np.full((k, 16), 127, np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = int(sess.run(None, {"A": np.full((1, k), 255, np.uint8)})[0][0, 0])
    return "exact" if got == 255 * 127 * k else f"saturates ({got} instead of {255 * 127 * k})"


def _logits(model: str, inputs: str, out: str, precise: bool) -> None:
    """Logits of ``model`` on the saved inputs, written to ``out`` (.npy)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.x64quantprecision", "1" if precise else "0")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.load(inputs)
    np.save(out, np.concatenate([sess.run(None, {name: x[i:i + 50]})[0] for i in range(0, len(x), 50)]))


def worker(argv: list[str]) -> None:
    if argv[0] == "probe":
        print(_probe())
    else:
        _logits(argv[1], argv[2], argv[3], precise=argv[0] == "precise")


# ------------------------------------------------------------------------------------------------- host
def _emulated(cpu: str, *args: str) -> str:
    """Run this script's worker under ``qemu-x86_64 -cpu CPU``; its stdout (QEMU's feature warnings dropped)."""
    cmd = ["qemu-x86_64", "-cpu", cpu, sys.executable, os.path.abspath(__file__), "--worker", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        err = [ln for ln in r.stderr.splitlines() if "TCG doesn't support" not in ln]
        raise UserError(f"onnxruntime under qemu-x86_64 -cpu {cpu} failed ({' '.join(err[-2:])[:300]}); "
                        "check that qemu-user is 7.2 or newer (AVX2 emulation)")
    return r.stdout.strip()


def _top1(logits, labels) -> float:
    return 100.0 * float((logits.argmax(1) == labels).mean())


def run(args: argparse.Namespace) -> list[dict]:
    """Top-1 native vs emulated for every file; prints a Markdown table and returns its rows."""
    import numpy as np
    import torch

    from utils.data import list_labelled_images
    from utils.deploy import export as ex
    from utils.deploy.int8 import weight_range
    from utils.deploy.runtime import open_model
    from utils.machine import describe_machine

    if shutil.which("qemu-x86_64") is None:
        raise UserError("qemu-x86_64 not found; install it with `apt-get install qemu-user` (Debian/Ubuntu)")
    first = open_model(args.models[0])
    items = ex.evenly_spaced(list_labelled_images(args.val_data, first.classes), args.images)
    labels = np.array([y for _, y in items])
    x = ex.load_images([p for p, _ in items], first.preprocess).numpy()
    print(f"{len(items)} validation images from {args.val_data}; this CPU: {describe_machine('cpu')}")
    print(f"u8 x s8 probe: here {_probe()}; emulated -cpu {args.cpu}: {_emulated(args.cpu, 'probe')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "x.npy")
        np.save(inputs, x)
        for path in args.models:
            model = open_model(path, device="cpu")
            if model.classes != first.classes or model.preprocess != first.preprocess:
                raise UserError(f"{path} has other classes or preprocessing than {args.models[0]}; "
                                "compare files exported from the same checkpoint")
            lo, hi = weight_range(path)
            row = {"file": path, "weights": f"[{lo}, {hi}]" if (lo, hi) != (0, 0) else "fp32",
                   "native": _top1(model.predict_batch(torch.from_numpy(x)).numpy(), labels)}
            modes = ("plain", "precise") if (lo, hi) != (0, 0) else ("plain",)
            for mode in modes:
                out = os.path.join(tmp, f"{mode}.npy")
                _emulated(args.cpu, mode, path, inputs, out)
                row[mode] = _top1(np.load(out), labels)
            rows.append(row)
            print(f"  {path}: native {row['native']:.2f}%, emulated {row['plain']:.2f}%", flush=True)
    print(f"\n| file | int8 weight range | top-1 here | top-1 as {args.cpu} (AVX2, no VNNI) | "
          f"{args.cpu} + session.x64quantprecision=1 |\n|---|---|---|---|---|")
    for r in rows:
        precise = f"{r['precise']:.2f}%" if "precise" in r else "-"
        print(f"| {r['file']} | {r['weights']} | {r['native']:.2f}% | {r['plain']:.2f}% | {precise} |")
    return rows


def main(argv: list[str] | None = None) -> list[dict] | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return None
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="ONNX files written by export.py (fp32 and/or int8)")
    p.add_argument("--val-data", required=True, help="validation folder with one sub-folder per class")
    p.add_argument("--images", type=int, default=2000, help="validation images, spread over all classes "
                                                             "(default 2000; 0 = all)")
    p.add_argument("--cpu", default="Haswell", help="QEMU CPU model without VNNI (default Haswell: AVX2 + FMA)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    run_main(main)
