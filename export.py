#!/usr/bin/env python
"""Export a train.py checkpoint to verified deployment files.

    python export.py RUN/best.pt                                  # onnx + torchscript + pt2 + int8 -> RUN/export/
    python export.py RUN/best.pt --format onnx --out /tmp/ship
    python export.py RUN/best.pt --format int8 --calib-data photos/ --max-drop 0.5
    python export.py RUN/best.pt --format tensorrt                # needs a GPU + tensorrt (untested here)
    python export.py RUN/best.pt --format executorch executorch_int8   # phone files: model.pte, model.int8.pte

Files: DIR/model.onnx (fp32), DIR/model.torchscript.pt, DIR/model.pt2 (torch.export), DIR/model.int8.onnx,
DIR/model.pte and DIR/model.int8.pte (ExecuTorch, XNNPACK: for phones, docs/phone.md), DIR/model.engine (TensorRT)
with its sidecar DIR/model.engine.json (class names, preprocessing), DIR/export.json (every check below). Each file
is verified on real validation images before it appears under its final name: fp32 files must match the
PyTorch logits within --tol (1e-4, relative to the largest logit when that exceeds 1) with the same top-1 on
every image; the TensorRT engine (fp16) within --tol-fp16 (same top-1 except near-ties); the int8 file is compared
with model.onnx (model.int8.pte with model.pte) image by image: top-1 accuracy on the validation images, with a 95% interval of the change (paired,
Newcombe), and top-1 agreement on those plus the calibration images. It is refused only when the loss is real: the
whole interval lies below -MAX_DROP, or agreement is significantly below --min-agreement (utils/deploy/int8_check.py), so
one flipped image on a small validation folder does not fail the export. A failed check is an error and leaves no
file behind (--int8-fallback: a refused int8 file is reported in one line and the fp32 files are kept).

int8 weights are 7-bit by default, exact on every x86 CPU (--int8-target vnni|arm for full 8-bit), and the
int8 file is timed against model.onnx on this machine (batch-1 latency, batch-32 throughput, a few seconds):
when int8 is not faster here, one line says so and names the missing CPU feature.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from tqdm import tqdm

from utils import machine
from utils.data import SkippedFiles, list_labelled_images
from utils.deploy import executorch_export as etx
from utils.deploy import export as ex
from utils.deploy import int8, int8_check
from utils.deploy.tensorrt_engine import sidecar_path
from utils.errors import UserError, run_main
from utils.files import write_json

FORMATS = ("onnx", "torchscript", "pt2", "int8", "executorch", "executorch_int8", "tensorrt")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "int8": "model.int8.onnx",
         "tensorrt": "model.engine", "pt2": "model.pt2", "executorch": "model.pte", "executorch_int8": "model.int8.pte"}
DEFAULT_FORMATS = ["onnx", "torchscript", "pt2", "int8"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by train.py or prune.py (e.g. RUN/best.pt)")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=DEFAULT_FORMATS,
                   help="what to write (default: onnx torchscript pt2 int8); int8 and tensorrt also write model.onnx, "
                        "executorch_int8 also writes model.pte (the phone files need ExecuTorch, docs/phone.md)")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder + /export)")
    p.add_argument("--val-data", help="validation folder with one sub-folder per class, used for every check "
                                      "(default: DATA/val, DATA = the 'data' entry of the checkpoint's config)")
    p.add_argument("--calib-data", help="folder of real images (any layout) to calibrate int8 on "
                                        "(default: DATA/train of the checkpoint's config)")
    p.add_argument("--calib-images", type=int, default=300,
                   help="calibration images, spread evenly over the folder (default 300)")
    p.add_argument("--calib-method", choices=("minmax", "percentile", "entropy"), default="minmax",
                   help="how activation ranges of model.int8.onnx are chosen from the calibration images (default "
                        "minmax; model.int8.pte uses the XNNPACK quantizer's histogram observer)")
    p.add_argument("--per-tensor", action="store_true",
                   help="one int8 scale per weight tensor instead of per output channel (less accurate; "
                        "model.int8.onnx and model.int8.pte alike)")
    p.add_argument("--int8-target", choices=("any-x86", "vnni", "arm"), default=None,
                   help="CPU the int8 file is for (default any-x86): any-x86 writes 7-bit weights, exact on every "
                        "x86 CPU (without VNNI, e.g. AVX2-only AMD Zen 2, 8-bit weights saturate in onnxruntime's "
                        "int16 pair sums: a user's model fell from 73.30%% to 64.50%% top-1, 73.15%% with 7 bits); "
                        "vnni (AVX-512 VNNI, AVX-VNNI, AMX) and arm write full 8-bit weights")
    p.add_argument("--reduce-range", action="store_true",
                   help="deprecated: 7-bit weights are now the default (--int8-target any-x86)")
    p.add_argument("--int8-fallback", action="store_true",
                   help="when the int8 file fails its accuracy check, say so in one line, write no int8 file and "
                        "finish with the fp32 files (exit 0) instead of stopping with an error (scripts/demo.sh)")
    p.add_argument("--quantize-stem", action="store_true",
                   help="int8 for the stem and first depthwise convolution too (by default they stay fp32: "
                        "onnxruntime's int8 kernels are slower there, measured 1.53 vs 1.78 ms for mobilenet_v2)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="largest acceptable loss of validation top-1 (points) of the int8 model vs model.onnx: it is "
                        "refused when the loss is significantly larger, i.e. when the whole 95%% interval of the paired "
                        "top-1 change (int8 minus fp32, Newcombe's interval over the same images) lies below -MAX_DROP; "
                        "a drop of one image on a small folder is within the interval and passes (default 1.0)")
    p.add_argument("--min-agreement", type=float, default=int8_check.DEFAULT_MIN_AGREEMENT,
                   help="refuse the int8 model when its top-1 agrees with model.onnx on significantly fewer than this "
                        "percent of the validation + calibration images (the 95%% Wilson interval lies below it): "
                        "catches a broken model when there are too few labelled images to prove an accuracy loss. "
                        "Working exports of the default run agree on 98.3-99.5%%, a 65%%-accurate 32 px test model "
                        f"on 96-97%% (default {int8_check.DEFAULT_MIN_AGREEMENT:g})")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar of the int8 accuracy check (the longest pass: every validation image "
                        "through both files)")
    p.add_argument("--verify-images", type=int, default=200,
                   help="validation images for the fp32 logit parity checks (default 200)")
    p.add_argument("--val-limit", type=int, default=2000,
                   help="validation images for the int8 accuracy check, spread over all classes; 0 = all (default "
                        "2000; the interval of the change says how much a smaller number can tell)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest allowed logit difference of fp32 exports vs PyTorch: absolute for logits within "
                        "+-1, times the largest |logit| beyond that (default 1e-4); a file beyond it still passes "
                        "within 4x PyTorch's own fp32 error on those images (measured against float64 only then: "
                        "pruned networks can carry large intermediate values)")
    p.add_argument("--tol-fp16", type=float, default=5e-2,
                   help="the same bound for the TensorRT engine, which runs in fp16 (and TF32 on Ampere or newer "
                        "GPUs); an all-fp16 graph of a small test model differed by up to 2.2e-2 x largest |logit| "
                        "(default 5e-2; a broken engine differs by about 1x)")
    return p


def _data_folder(args: argparse.Namespace, config: dict[str, Any], sub: str, flag: str) -> str:
    data = config.get("data")
    if not data:
        raise UserError(f"{args.checkpoint} does not record its data folder (config 'data'); pass {flag} DIR")
    path = os.path.join(data, sub)
    if not os.path.isdir(path):
        raise UserError(f"{path} (from {args.checkpoint}'s config 'data') not found; pass {flag} DIR")
    return path


def _read(ex, paths: list[str], preprocess: dict[str, Any], skipped: SkippedFiles, what: str):
    """Decode ``paths`` (utils.deploy.export.read_images); unreadable files are named once and counted in ``skipped``;
    a UserError when none could be read."""
    read = ex.read_images(paths, preprocess)
    skipped.add(read.failed)
    if paths and not read.kept:
        raise UserError(f"none of the {len(paths)} {what} could be read (first: {read.failed[0][0]}: "
                        f"{read.failed[0][1]}); fix or remove them")
    return read


def _publish(tmp: str, final: str) -> None:
    """Give a verified file its final name (atomic on one file system), readable like any other file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # temp files are created private (0600)
    os.replace(tmp, final)


def _discard(tmp: str) -> None:
    if os.path.exists(tmp):
        os.remove(tmp)


def int8_target(args: argparse.Namespace) -> str:
    """--int8-target, with the deprecated --reduce-range folded in (7-bit weights are the default now)."""
    if args.reduce_range:
        if args.int8_target not in (None, "any-x86"):
            raise UserError(f"--reduce-range (7-bit weights) contradicts --int8-target {args.int8_target} "
                            "(8-bit weights); drop --reduce-range")
        print("note: --reduce-range is deprecated: 7-bit weights are the default now (--int8-target any-x86)")
    return args.int8_target or int8.DEFAULT_TARGET


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import onnx  # noqa: PLC0415  (lazy: optional/heavy dependency)
    import onnxruntime  # noqa: PLC0415  (lazy: optional/heavy dependency)


    args = get_args_parser().parse_args(argv)
    args.int8_target = int8_target(args)
    formats = list(dict.fromkeys(args.format))
    if ("int8" in formats or "tensorrt" in formats) and "onnx" not in formats:
        formats.insert(0, "onnx")  # both are built from the verified fp32 ONNX file
    if "executorch_int8" in formats and "executorch" not in formats:
        formats.insert(formats.index("executorch_int8"), "executorch")  # its accuracy is checked against model.pte
    et_version = _require_executorch(formats)  # one line, before any work, when ExecuTorch is missing
    src = ex.load_export_source(args.checkpoint)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "export")
    img_size = int(src.preprocess["img_size"])
    paths = {f: os.path.join(out, FILES[f]) for f in FORMATS}
    if "tensorrt" in formats:  # fail before any work (and before creating --out) when no engine can be built here
        ex.require_tensorrt(ex.trtexec_command(paths["onnx"], paths["tensorrt"], img_size),
                            first=f"`python export.py {args.checkpoint} --format onnx --out {out}`, ")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)

    val_dir = args.val_data or _data_folder(args, src.config, "val", "--val-data")
    val = list_labelled_images(val_dir, src.classes)
    verify = ex.evenly_spaced(val, args.verify_images)
    skipped = SkippedFiles()  # unreadable images of every pass below, each named once, counted in export.json
    verify_x = _read(ex, [p for p, _ in verify], src.preprocess, skipped, f"validation images from {val_dir}").x
    print(f"verifying on {len(verify_x)} real validation images from {val_dir}")
    with torch.no_grad():
        reference = ex.batched_logits(src.model, verify_x)

    report: dict[str, Any] = {
        "checkpoint": os.path.abspath(args.checkpoint), "arch": src.arch, "classes": src.classes,
        "preprocess": src.preprocess, "pruned": src.pruned, "val_data": val_dir,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     **({"executorch": et_version} if et_version else {})},
        "machine": machine.describe_machine("cpu"),
        "files": {}, "checks": {},
    }
    report["calibration"] = src.calibration  # temperature + reject threshold every file carries (docs/trust.md)

    rounding: list[float] = []  # PyTorch's own fp32 error on verify_x, measured once if a file needs it

    def fp32_rounding() -> float:
        if not rounding:
            rounding.append(ex.fp32_rounding_error(src.model, verify_x, reference))
        return rounding[0]

    def verified(fmt: str, tmp: str, facts: dict[str, Any]) -> None:
        got = ex.batched_logits(ex.file_predictor(tmp), verify_x)
        try:
            check = ex.verify_parity(fmt, paths[fmt], reference, got, args.tol, rounding=fp32_rounding)
        except UserError:
            _discard(tmp)
            raise
        _publish(tmp, paths[fmt])
        report["files"][fmt] = {"path": paths[fmt], "bytes": os.path.getsize(paths[fmt]), **facts}
        report["checks"][fmt] = check
        print(f"{fmt:12s} {paths[fmt]}  {os.path.getsize(paths[fmt]) / 1e6:.2f} MB  max |logit diff| "
              f"{check['max_abs_diff']:.2e}, top-1 equal on {check['top1_agree']}/{check['images']}")

    if "onnx" in formats:
        tmp = paths["onnx"] + ".unverified"
        facts = ex.export_onnx(src.model, tmp, img_size, src.classes, src.preprocess)
        facts["exporter"] = f"torch.onnx.export(dynamo=False, opset_version={ex.ONNX_OPSET}, do_constant_folding=True)"
        verified("onnx", tmp, facts)
    if "torchscript" in formats:
        tmp = paths["torchscript"] + ".unverified"
        verified("torchscript", tmp, ex.export_torchscript(src.model, tmp, img_size, src.classes, src.preprocess))
    if "pt2" in formats:

        tmp = paths["pt2"] + ".unverified"
        verified("pt2", tmp, etx.export_pt2(src.model, tmp, img_size, src.classes, src.preprocess))
    if "int8" in formats:
        report["checks"]["int8"] = _export_int8(args, src, paths, report, val, verify_x, ex, skipped)
    if "executorch" in formats:
        _export_executorch(args, src, paths, report, val, verify_x, ex, skipped, verified, "executorch_int8" in formats)
    report.update(skipped_images=len(skipped), skipped_files=skipped.records())
    _write_report(out, report)
    if "tensorrt" in formats:  # built from the verified ONNX file; runs here only against a fake TensorRT
        report["checks"]["tensorrt"] = _export_tensorrt(args, src, paths, report, verify_x, reference, ex)
        _write_report(out, report)
    print(f"wrote {out}/export.json" + (f" ({len(skipped)} unreadable images skipped)" if len(skipped) else ""))
    return report


def _export_int8(args, src, paths, report, val, verify_x, ex, skipped: SkippedFiles) -> dict[str, Any]:
    """Quantize, check top-1 against fp32 on the validation set, time both files here, publish."""
    target = int8.TARGETS[args.int8_target]
    calib_dir, calib = _calibration(args, src, ex, skipped,
                                    f"{target.weight_bits}-bit weights for --int8-target {target.name}")
    tmp = paths["int8"] + ".unverified"
    t0 = time.time()
    facts = ex.quantize_int8(paths["onnx"], tmp, calib, per_channel=not args.per_tensor,
                             reduce_range=target.reduce_range, method=args.calib_method,
                             fp32_stem=not args.quantize_stem)
    facts["seconds"] = round(time.time() - t0, 1)
    facts["calibration_data"] = calib_dir
    facts["target"] = {"value": target.name, "weight_bits": target.weight_bits, "reason": target.reason}
    facts["weight_range"] = list(int8.weight_range(tmp))

    missing = int8.missing_feature(_cpu())
    if not target.reduce_range and missing and "ARM" not in missing:
        print(f"note: this CPU ({missing}) saturates 8-bit int8 products, so the accuracy check below can be "
              f"lower than on the {target.name} target")
    verdict = _int8_accuracy(args, src, paths["onnx"], tmp, val, calib, ex, skipped)
    check = _int8_verdict(args, verdict, tmp, paths["int8"], "model.onnx",
                          "try --calib-method percentile/entropy, ")
    if not check["passed"]:
        return check
    report["speed"] = _int8_speed(paths["onnx"], tmp, verify_x)
    _publish(tmp, paths["int8"])
    report["files"]["int8"] = {"path": paths["int8"], "bytes": os.path.getsize(paths["int8"]), **facts}
    print(f"int8         {paths['int8']}  {os.path.getsize(paths['int8']) / 1e6:.2f} MB")
    return check


FEW_CALIBRATION_IMAGES = 32  # below this, say so: the accuracy check may pass on val and still miss real inputs


def _calibration(args, src, ex, skipped: SkippedFiles, what: str) -> tuple[str, torch.Tensor]:
    """(folder, decoded images) of the int8 calibration set: --calib-images spread over --calib-data."""
    calib_dir = args.calib_data or _data_folder(args, src.config, "train", "--calib-data")
    calib_paths = ex.evenly_spaced(ex.list_images(calib_dir), args.calib_images)
    if not calib_paths:
        raise UserError(f"no images found in {calib_dir}; pass --calib-data DIR with a few hundred real images")
    x = _read(ex, calib_paths, src.preprocess, skipped, f"calibration images from {calib_dir}").x
    unread = f"; {len(calib_paths) - len(x)} unreadable skipped" if len(x) < len(calib_paths) else ""
    print(f"calibrating int8 on {len(x)} images from {calib_dir} ({what}{unread})")
    if len(x) < FEW_CALIBRATION_IMAGES:
        print(f"warning: int8 activation ranges from {len(x)} image{'s' if len(x) != 1 else ''} can clip the images "
              f"they did not see; pass --calib-data with a few hundred real images (--calib-images, default "
              f"{args.calib_images})")
    return calib_dir, x


def _int8_verdict(args, verdict: int8_check.Int8Verdict, tmp: str, final: str, fp32_name: str,
                  hint: str = "") -> dict[str, Any]:
    """The int8 check's record; a refused file is discarded and raised as a UserError (one printed line and no
    file with --int8-fallback, when the caller goes on with the fp32 files)."""
    check = verdict.record()
    check["passed"] = verdict.passed
    if not verdict.passed:
        _discard(tmp)
        e = UserError(f"int8 model {final} {verdict.reason()}; use more or more representative --calib-data, "
                      f"{hint}or ship the fp32 {fp32_name}")
        if not args.int8_fallback:
            raise e
        _discard(final)  # an int8 file from an earlier export must not pass for this one
        label = "int8" if final.endswith(".onnx") else "pte int8"
        print(f"{label:12s} not written, continuing with the fp32 files (--int8-fallback): {e}")
    return check


def _require_executorch(formats: list[str]) -> str | None:
    """ExecuTorch's version when a phone format is asked for (a one-line UserError when it is missing)."""
    if not {"executorch", "executorch_int8"} & set(formats):
        return None

    return etx.require_executorch("--format " + " ".join(f for f in formats if f.startswith("executorch")))


def _export_executorch(args, src, paths, report, val, verify_x, ex, skipped: SkippedFiles, verified,
                       with_int8: bool) -> None:
    """model.pte (fp32, checked like the other fp32 files) and, with ``with_int8``, model.int8.pte: PT2E int8
    calibrated like model.int8.onnx and checked against model.pte by the same accuracy check."""

    img_size = int(src.preprocess["img_size"])
    tmp = paths["executorch"] + ".unverified"
    t0 = time.time()
    facts = etx.export_pte(src.model, tmp, img_size, src.classes, src.preprocess)
    verified("executorch", tmp, {**facts, "seconds": round(time.time() - t0, 1)})
    if not with_int8:
        return
    final = paths["executorch_int8"]
    calib_dir, calib = _calibration(args, src, ex, skipped, "ExecuTorch XNNPACK quantizer, int8 "
                                    + ("per-tensor" if args.per_tensor else "per-channel") + " weights")
    tmp = final + ".unverified"
    t0 = time.time()
    facts = etx.quantize_pte_int8(src.model, tmp, img_size, calib, src.classes, src.preprocess,
                                  per_channel=not args.per_tensor)
    facts.update(seconds=round(time.time() - t0, 1), calibration_data=calib_dir)
    verdict = _int8_accuracy(args, src, paths["executorch"], tmp, val, calib, ex, skipped)
    report["checks"]["executorch_int8"] = check = _int8_verdict(args, verdict, tmp, final, "model.pte")
    if check["passed"]:
        _publish(tmp, final)
        report["files"]["executorch_int8"] = {"path": final, "bytes": os.path.getsize(final), **facts}
        print(f"{'pte int8':12s} {final}  {os.path.getsize(final) / 1e6:.2f} MB")


def _cpu():
    return machine.cpu_info()  # looked up at call time (tests stand in another CPU)


def _int8_accuracy(args, src, fp32_path: str, int8_path: str, val, calib: torch.Tensor, ex,
                   skipped: SkippedFiles) -> int8_check.Int8Verdict:
    """Compare the int8 file with the fp32 file image by image: top-1 on up to --val-limit validation images,
    agreement on those plus the calibration images (already decoded); prints the one-line summary. Unreadable
    validation images are left out (and counted in ``skipped``)."""
    acc_items = ex.evenly_spaced(val, args.val_limit)
    fp32_predict, int8_predict = ex.file_predictor(fp32_path), ex.file_predictor(int8_path)
    fp32_pred, int8_pred, labels = [], [], []
    chunk = 64  # decode in chunks: the whole validation set need not fit in memory; the bar moves per chunk
    with tqdm(total=len(acc_items) + len(calib), desc="int8 check", unit="img", disable=not args.progress,
              leave=False, dynamic_ncols=True) as bar:
        for i in range(0, len(acc_items), chunk):
            part = acc_items[i:i + chunk]
            read = ex.read_images([p for p, _ in part], src.preprocess)
            skipped.add(read.failed)
            if read.kept:
                labels.append(torch.tensor([part[k][1] for k in read.kept]))
                fp32_pred.append(ex.batched_logits(fp32_predict, read.x).argmax(1))
                int8_pred.append(ex.batched_logits(int8_predict, read.x).argmax(1))
            bar.update(len(part))
        if not labels:
            raise UserError(f"none of the {len(acc_items)} validation images could be read; fix or remove them")
        fp32_extra, int8_extra = [], []
        for i in range(0, len(calib), chunk):
            fp32_extra.append(ex.batched_logits(fp32_predict, calib[i:i + chunk]).argmax(1))
            int8_extra.append(ex.batched_logits(int8_predict, calib[i:i + chunk]).argmax(1))
            bar.update(len(calib[i:i + chunk]))
    verdict = int8_check.judge_int8(torch.cat(fp32_pred), torch.cat(int8_pred), torch.cat(labels),
                                    torch.cat(fp32_extra), torch.cat(int8_extra), src.classes, args.max_drop,
                                    args.min_agreement)  # calib is never empty (_calibration raises)
    print(verdict.summary())
    return verdict


def _export_tensorrt(args, src, paths, report, verify_x, reference, ex) -> dict[str, Any]:
    """Build the engine under a temporary name, check it on the verification images, then publish it + sidecar."""

    tmp, final = paths["tensorrt"] + ".unverified", paths["tensorrt"]
    facts = ex.build_tensorrt_engine(paths["onnx"], tmp, int(src.preprocess["img_size"]), src.classes, src.preprocess,
                                     calibration=src.calibration)
    report["versions"]["tensorrt"] = facts["tensorrt"]
    try:
        got = ex.batched_logits(ex.engine_predictor(tmp), verify_x)
        check = ex.verify_parity("tensorrt", final, reference, got, args.tol_fp16, near_ties=True, flag="--tol-fp16",
                                 hint=f"report this with your TensorRT version ({facts['tensorrt']}); "
                                      "model.onnx is verified and can be used instead")
    except BaseException:  # a refused or crashed check leaves neither file behind
        _discard(tmp)
        _discard(sidecar_path(tmp))
        raise
    _publish(sidecar_path(tmp), sidecar_path(final))  # sidecar first: it names the engine's SHA-256
    _publish(tmp, final)
    facts["sidecar"] = sidecar_path(final)
    facts["equivalent"] = ex.trtexec_command(paths["onnx"], final, int(src.preprocess["img_size"]))
    report["files"]["tensorrt"] = {"path": final, "bytes": os.path.getsize(final), **facts}
    print(f"tensorrt     {final}  {os.path.getsize(final) / 1e6:.2f} MB, {facts['precision']}, max |logit diff| "
          f"{check['max_abs_diff']:.2e}, top-1 equal on {check['top1_agree']}/{check['images']}")
    return check


def _int8_speed(fp32_path: str, int8_path: str, images: torch.Tensor) -> dict[str, Any]:
    """Time int8 against fp32 on this machine (a few seconds); print it, and one line when int8 is not faster."""

    speed = int8.time_int8_vs_fp32(fp32_path, int8_path, images.numpy())
    speed = {"machine": machine.describe_machine("cpu"), **speed}
    b1, bn = speed["batch1_p50_ms"], speed[f"batch{int8.SPEED_BATCH}_img_s"]
    print(f"int8 speed   batch-1 p50 {b1['int8']:.3f} ms vs {b1['fp32']:.3f} ms fp32 ({b1['int8'] / b1['fp32']:.2f}x), "
          f"batch-{int8.SPEED_BATCH} {bn['int8']:.0f} vs {bn['fp32']:.0f} img/s fp32 ({bn['int8'] / bn['fp32']:.2f}x) "
          f"on {speed['machine']}")
    speed["note"] = int8.speed_note(speed, _cpu())
    if speed["note"]:
        print(f"note: {speed['note']}")
    return speed


def _write_report(out: str, report: dict[str, Any]) -> None:

    write_json(os.path.join(out, "export.json"), report)


if __name__ == "__main__":
    run_main(main)
