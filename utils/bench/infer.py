"""Inference speed of the deployment variants of one model, measured interleaved in one run.

Variants: PyTorch eager fp32, eager channels_last, TorchScript (trace + freeze), onnxruntime fp32 and
onnxruntime int8 (static QDQ, u8 activations + s8 per-channel weights), torch.export (.pt2) and ExecuTorch fp32
and int8 (.pte, XNNPACK; fed one image at a time, the program's input shape) - the files export.py writes,
produced here with the same code. The ExecuTorch rows are measured when ExecuTorch imports here. For each: file size, batch-1 latency p50/p90 (ms) and batch-32
throughput (images/s); plus params and MACs. Prints a Markdown table under the machine it was measured on
(CPU model and features: int8 pays only with VNNI/AMX/ARM dot-product), saves CSV + Markdown.

    python benchmark.py infer RUN/best.pt
    python benchmark.py infer --model mobilenet_v2 --width-mult 0.5 --img-size 224

Timing is interleaved (A B C A B C ...) so machine noise hits every variant alike; on a shared machine
compare ratios, and read the reported load average.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import warnings
from typing import Any

import torch

from models import build_model, count_macs, count_params, load_pretrained
from utils.data import IMAGENET_MEAN, IMAGENET_STD
from utils.deploy import executorch_export as etx
from utils.deploy import export as ex
from utils.deploy.export import INPUT_NAME, load_export_source
from utils.deploy.onnx_io import onnx_session
from utils.errors import UserError
from utils.files import REPO_ROOT, csv_text, write_text
from utils.machine import describe_machine
from utils.timing import interleaved_timings, load_average, median, percentile

DEFAULT_CALIB = os.path.join(REPO_ROOT, "tests", "assets", "photos")
VARIANTS = ("eager", "channels_last", "torchscript", "onnxruntime", "onnxruntime_int8", "pt2", "executorch",
            "executorch_int8")
EXECUTORCH_VARIANTS = ("executorch", "executorch_int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark.py infer``."""
    parser.add_argument("checkpoint", nargs="?",
                        help="checkpoint to benchmark (train.py or utils.pruning); omit it to use --model")
    parser.add_argument("--model", default="mobilenet_v2",
                        help="architecture when no checkpoint is given (default mobilenet_v2)")
    parser.add_argument("--width-mult", type=float, default=1.0, help="width multiplier for --model (default 1.0)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes for --model (default 1000)")
    parser.add_argument("--pretrained", default="none",
                        help="weights for --model: none (random init; speed does not depend on weights) or imagenet")
    parser.add_argument("--img-size", type=int,
                        help="input size (default: the checkpoint's preprocess img_size, else 224)")
    parser.add_argument("--calib-data", default=DEFAULT_CALIB,
                        help="real images to calibrate the int8 model on (default: tests/assets/photos)")
    parser.add_argument("--calib-images", type=int, default=100, help="calibration images used (default 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput test (default 32)")
    parser.add_argument("--repeats", type=_at_least_one, default=30, help="timed batch-1 calls per variant (default 30)")
    parser.add_argument("--batch-repeats", type=_at_least_one, default=5,
                        help="timed batch calls per variant for throughput (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="which variants to measure (default: all; the executorch ones only when ExecuTorch "
                             "is installed)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for PyTorch and onnxruntime alike (default 0: each library's default). "
                             "On a busy shared machine use 1: multi-threaded PyTorch stalls at every barrier when "
                             "another process holds a core (measured 2100 ms vs 22 ms per image at load 4 on 2 cores)")
    parser.add_argument("--block", type=_at_least_one, default=5,
                        help="timed calls in a row per variant before switching (after a 50 ms pause and one untimed "
                             "call, so the previous runtime's spinning threads are gone); 1 = strict A B C A B C "
                             "(default 5)")
    parser.add_argument("--ort-spinning", choices=("on", "off"), default="on",
                        help="onnxruntime worker threads busy-wait between operators (on: onnxruntime's default, what "
                             "a serving process gets; off: they sleep, which frees the cores for other work but adds "
                             "a wake-up to every operator; default on)")
    parser.add_argument("--out", help="CSV path (a .md with the table is written next to it; default: "
                                      "CHECKPOINT_FOLDER/benchmark_infer.csv or runs/benchmark/infer_MODEL_WIDTH_SIZE.csv)")


def _model_and_meta(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """The fp32 eval model, its preprocess dict (for calibration images) and a label for the table."""

    if args.checkpoint:
        src = load_export_source(args.checkpoint)
        pre = dict(src.preprocess)
        if args.img_size:
            pre.update(img_size=args.img_size, resize_size=args.img_size)
        a = src.arch
        label = f"{a['name']} {a['width_mult']:g}{' pruned' if src.pruned else ''} ({os.path.basename(args.checkpoint)})"
        return src.model, pre, label
    model = build_model(args.model, num_classes=args.num_classes, width_mult=args.width_mult)
    if args.pretrained != "none":
        load_pretrained(model, args.pretrained)
    size = args.img_size or 224
    pre = {"img_size": size, "resize_size": round(size * 256 / 224), "mean": list(IMAGENET_MEAN),
           "std": list(IMAGENET_STD)}
    return model.eval(), pre, f"{args.model} {args.width_mult:g}"


def _state_dict_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def build_variants(model: torch.nn.Module, pre: dict[str, Any], args: argparse.Namespace, tmp: str
                   ) -> dict[str, tuple[Any, str, int]]:
    """name -> (callable taking an NCHW fp32 tensor, input layout, file bytes)."""

    size = int(pre["img_size"])
    out: dict[str, tuple[Any, str, int]] = {}
    want = set(args.variants)
    if "eager" in want:
        out["eager"] = (model, "nchw", _state_dict_bytes(model))
    if "channels_last" in want:
        cl = model.to(memory_format=torch.channels_last) if "eager" not in want else \
            _clone(model).to(memory_format=torch.channels_last)
        out["channels_last"] = (cl, "nhwc", _state_dict_bytes(model))
    if "torchscript" in want:
        path = os.path.join(tmp, "model.torchscript.pt")
        ex.export_torchscript(model, path, size, [], pre)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated in torch>=2.9 but works
            out["torchscript"] = (torch.jit.load(path, map_location="cpu"), "nchw", os.path.getsize(path))
    if want & {"onnxruntime", "onnxruntime_int8"}:
        onnx_path = os.path.join(tmp, "model.onnx")
        ex.export_onnx(model, onnx_path, size, [], pre)
        if "onnxruntime" in want:
            sess = onnx_session(onnx_path, threads=args.threads, spinning=args.ort_spinning == "on")
            out["onnxruntime"] = (_ort_fn(sess), "numpy", os.path.getsize(onnx_path))
        if "onnxruntime_int8" in want:
            int8_path = os.path.join(tmp, "model.int8.onnx")
            ex.quantize_int8(onnx_path, int8_path, _calibration_images(args, pre))
            sess = onnx_session(int8_path, threads=args.threads, spinning=args.ort_spinning == "on")
            out["onnxruntime_int8"] = (_ort_fn(sess), "numpy", os.path.getsize(int8_path))
    if want & {"pt2", *EXECUTORCH_VARIANTS}:
        out.update(_exported_variants(model, pre, args, tmp, want))
    return out


def _calibration_images(args: argparse.Namespace, pre: dict[str, Any]) -> torch.Tensor:

    calib_paths = ex.evenly_spaced(ex.list_images(args.calib_data), args.calib_images)
    if not calib_paths:
        raise UserError(f"no images in {args.calib_data}; pass --calib-data DIR with real photos")
    return ex.load_images(calib_paths, pre)


def _exported_variants(model: torch.nn.Module, pre: dict[str, Any], args: argparse.Namespace, tmp: str,
                       want: set[str]) -> dict[str, tuple[Any, str, int]]:
    """pt2 and ExecuTorch (.pte, XNNPACK) variants, written by utils/deploy/executorch_export.py as export.py does."""

    size, out = int(pre["img_size"]), {}
    if "pt2" in want:
        path = os.path.join(tmp, "model.pt2")
        etx.export_pt2(model, path, size, [], pre)
        out["pt2"] = (etx.open_pt2(path)[1], "nchw", os.path.getsize(path))
    for name in EXECUTORCH_VARIANTS:
        if name in want:
            path = os.path.join(tmp, f"{name}.pte")
            if name == "executorch":
                etx.export_pte(model, path, size, [], pre)
            else:
                etx.quantize_pte_int8(model, path, size, _calibration_images(args, pre), [], pre)
            out[name] = (etx.open_pte(path)[1], "nchw", os.path.getsize(path))
    return out


def resolve_variants(args: argparse.Namespace) -> list[str]:
    """--variants, or every variant (the ExecuTorch ones only when ExecuTorch imports here, else a note line)."""

    if args.variants:
        if set(args.variants) & set(EXECUTORCH_VARIANTS):
            etx.require_executorch("the executorch variants")
        return list(dict.fromkeys(args.variants))
    problem = etx.executorch_problem()
    if problem:
        print(f"note: no ExecuTorch rows: ExecuTorch cannot be imported here ({problem}; `{etx.INSTALL}`)")
        return [v for v in VARIANTS if v not in EXECUTORCH_VARIANTS]
    return list(VARIANTS)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _clone(model: torch.nn.Module) -> torch.nn.Module:

    return copy.deepcopy(model)


def _ort_fn(sess):

    return lambda x: sess.run(None, {INPUT_NAME: x})


def measure(variants: dict[str, tuple[Any, str, int]], size: int, batch: int, repeats: int, batch_repeats: int,
            warmup: int, block: int = 1) -> dict[str, dict[str, float]]:
    """Batch-1 latency p50/p90 (ms) and batch throughput (images/s) per variant, interleaved."""

    def calls(n: int) -> dict[str, Any]:
        x = torch.rand(n, 3, size, size)
        inputs = {"nchw": x, "nhwc": x.contiguous(memory_format=torch.channels_last), "numpy": x.numpy()}
        return {name: (lambda f=f, i=inputs[layout]: f(i)) for name, (f, layout, _) in variants.items()}

    with torch.inference_mode():
        one = interleaved_timings(calls(1), repeats=repeats, warmup=warmup, block=block, settle=0.05)
        many = interleaved_timings(calls(batch), repeats=batch_repeats, warmup=1, block=min(block, 2), settle=0.05)
    return {name: {"b1_p50_ms": 1000 * median(one[name]), "b1_p90_ms": 1000 * percentile(one[name], 90),
                   "throughput": batch / median(many[name])} for name in variants}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build every variant, time them interleaved, print the Markdown table, save CSV + Markdown."""

    if args.threads:
        torch.set_num_threads(args.threads)
    args.variants = resolve_variants(args)
    model, pre, label = _model_and_meta(args)
    size = int(pre["img_size"])
    params, macs = count_params(model), count_macs(model, size)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"exporting {', '.join(args.variants)} ...")
        variants = build_variants(model, pre, args, tmp)
        print(f"timing {len(variants)} variants interleaved: {args.repeats} x batch 1, "
              f"{args.batch_repeats} x batch {args.batch_size} (torch threads {torch.get_num_threads()}, "
              f"onnxruntime threads {args.threads or 'default'}, spinning {args.ort_spinning})")
        res = measure(variants, size, args.batch_size, args.repeats, args.batch_repeats, args.warmup, args.block)
    load = f"{load_before} -> {load_average()}"
    rows = [{"model": label, "img_size": size, "variant": name, "params": params, "macs": macs,
             "file_mb": round(variants[name][2] / 1e6, 2), "b1_p50_ms": round(r["b1_p50_ms"], 2),
             "b1_p90_ms": round(r["b1_p90_ms"], 2), f"b{args.batch_size}_img_s": round(r["throughput"], 1),
             "load_avg": load, "machine": describe_machine("cpu")} for name, r in res.items()]
    table = format_table(rows, args.batch_size)
    print(table)
    out = args.out or (os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "benchmark_infer.csv")
                       if args.checkpoint else os.path.join(
                           "runs", "benchmark", f"infer_{args.model}_{args.width_mult:g}_{size}.csv"))
    _save(out, rows, table)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")
    return rows


def format_table(rows: list[dict[str, Any]], batch: int) -> str:
    """Markdown table with speed-ups relative to eager fp32 (when measured), under the machine it ran on."""
    r0 = rows[0]
    base = next((r for r in rows if r["variant"] == "eager"), None)
    lines = [f"machine: {r0['machine']}", f"{r0['model']}, {r0['img_size']} px: {r0['params'] / 1e6:.2f} M params, {r0['macs'] / 1e6:.1f} M MACs; "
             f"load average {r0['load_avg']}", "",
             f"| variant | file MB | batch-1 p50 ms | batch-1 p90 ms | batch-{batch} img/s | b1 vs eager |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['b1_p50_ms'] / base['b1_p50_ms']:.2f}x" if base else ""
        lines.append(f"| {r['variant']} | {r['file_mb']:.2f} | {r['b1_p50_ms']:.2f} | {r['b1_p90_ms']:.2f} | "
                     f"{r[f'b{batch}_img_s']:.1f} | {ratio} |")
    by = {r["variant"]: r for r in rows}
    pairs = (("onnxruntime", "onnxruntime_int8", "onnxruntime"), ("executorch", "executorch_int8", "ExecuTorch (XNNPACK)"))
    ratios = [f"int8 / fp32 {what} batch-1 latency: {by[q]['b1_p50_ms'] / by[fp32]['b1_p50_ms']:.2f}x"
              for fp32, q, what in pairs if q in by and fp32 in by]
    lines += [""] + ratios if ratios else []
    return "\n".join(lines)


def _save(path: str, rows: list[dict[str, Any]], table: str) -> None:
    write_text(path, csv_text(list(rows[0]), rows))
    write_text(os.path.splitext(path)[0] + ".md", table + "\n")
