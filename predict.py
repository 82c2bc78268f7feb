"""Classify images with a checkpoint, TorchScript, ONNX or TensorRT engine file; print the top-k classes per image.

    python predict.py runs/fmnist/best.pt photo.jpg
    python predict.py runs/fmnist/export/model.onnx photos/ 'more/**/*.png' --topk 3 --json preds.json

Class names and preprocessing come from the model file. Unreadable files are reported and skipped.
Probabilities are calibrated with the temperature stored with the model (docs/trust.md); ``--threshold auto``
answers ``unknown`` below the model's stored reject threshold.
"""
from __future__ import annotations

from utils.process import configure_process  # imports nothing that loads torch

if __name__ == "__main__":
    configure_process("infer")  # idle OpenMP threads sleep (utils/process.py); must precede torch

import argparse
import os
import sys
from typing import Any

from utils.data import SkippedFiles
from utils.deploy.inference import add_run_arguments, as_records, expand_image_args, run_on_files
from utils.deploy.runtime import LoadedModel, open_model
from utils.errors import UserError, run_main
from utils.files import csv_text, write_json, write_text
from utils.log import plural_s, rate_text
from utils.trust.calibration import calibrated_probs
from utils.trust.reject import UNKNOWN
from utils.trust.summary import add_predict_arguments
from utils.trust.tta import with_flip_tta


def predict_files(model: LoadedModel, paths: list[str], topk: int = 5, batch_size: int = 64,
                  workers: int | None = None, progress: bool = True, temperature: float = 1.0,
                  threshold: float | None = None, tta: bool = False) -> dict[str, Any]:
    """Top-k predictions for every readable file: ``{"predictions": [...], "failed": [...], ...speed}``.

    Each prediction is ``{"file", "top": [{"class", "prob"}, ...], "answer"}`` in input order; probabilities
    are ``softmax(logits / temperature)``; ``answer`` is the top-1 class, or ``unknown`` when ``threshold`` is
    given and the top-1 probability is below it. ``tta`` averages the logits of each image and its mirror image.
    """

    if tta:

        model = with_flip_tta(model)
    res = run_on_files(model, paths, batch_size=batch_size, workers=workers, desc="predict", progress=progress)
    k = min(topk, model.num_classes)
    probs = calibrated_probs(res.logits, temperature)
    p, idx = probs.topk(k, dim=1) if len(probs) else (probs, probs.long())
    preds = [{"file": paths[int(i)], "top": [{"class": model.classes[int(c)], "prob": float(q)}
                                             for c, q in zip(idx[row], p[row])]}
             for row, i in enumerate(res.indices)]
    for pr in preds:
        pr["answer"] = UNKNOWN if threshold is not None and pr["top"][0]["prob"] < threshold else pr["top"][0]["class"]
    return {"predictions": preds, "failed": res.failed, "images_per_s": res.images_per_s,
            "model_images_per_s": res.model_images_per_s, "seconds": res.seconds}


def format_table(preds: list[dict[str, Any]]) -> str:
    """One line per file: the file, then each top-k class with its probability in percent."""
    if not preds:
        return ""
    k = len(preds[0]["top"])
    files = [p["file"] for p in preds]
    # Long temp/absolute paths hide the names: show them relative to the folder they share.
    base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    prefix = []
    if len(files) > 1 and base not in ("", os.sep):
        files = [os.path.relpath(os.path.abspath(f), base) for f in files]
        prefix = [f"(files in {base})"]
    fw = min(max(len("file"), *(len(f) for f in files)), 60)
    cells = [[f"{t['class']} {100 * t['prob']:5.1f}%" for t in p["top"]] for p in preds]
    if any(p.get("answer") == "unknown" for p in preds):  # a reject threshold is in use: show the answer first
        cells = [[p["answer"]] + c for p, c in zip(preds, cells)]
        names = ["answer"] + [f"top-{j + 1}" for j in range(k)]
    else:
        names = [f"top-{j + 1}" for j in range(k)]
    k = len(names)
    cw = [max(len(names[j]), *(len(c[j]) for c in cells)) for j in range(k)]
    head = f"{'file':<{fw}}  " + "  ".join(f"{names[j]:<{cw[j]}}" for j in range(k))
    lines = prefix + [head, "-" * len(head)]
    for f, c in zip(files, cells):
        shown = f if len(f) <= fw else "..." + f[-(fw - 3):]
        lines.append(f"{shown:<{fw}}  " + "  ".join(f"{c[j]:<{cw[j]}}" for j in range(k)))
    return "\n".join(lines)


NOT_FOUND = "no such file, or no images in that folder / matching that pattern"


def write_predictions_json(path: str, result: dict[str, Any], model: LoadedModel) -> None:
    doc = {"model": model.path, "kind": model.kind, "engine": model.engine.value,
           "temperature": result.get("temperature"), "threshold": result.get("threshold"),
           "predictions": result["predictions"],
           "skipped": as_records(result["failed"]) + as_records([(item, NOT_FOUND) for item in result["unmatched"]])}
    write_json(path, doc)


def write_predictions_csv(path: str, result: dict[str, Any]) -> None:
    """Wide CSV: file, answer, class_1, prob_1, ..., class_k, prob_k (one row per readable image). ``answer`` is
    class_1, or ``unknown`` below the ``--threshold`` in use."""
    preds = result["predictions"]
    k = len(preds[0]["top"]) if preds else 0
    header = ["file", "answer"] + [h for j in range(1, k + 1) for h in (f"class_{j}", f"prob_{j}")]
    write_text(path, csv_text(header, [[p["file"], p["answer"]]
                                       + [v for t in p["top"] for v in (t["class"], f"{t['prob']:.6f}")]
                                       for p in preds]))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Print the top-k classes of each image for a checkpoint, TorchScript, ONNX, torch.export (.pt2), "
                    "ExecuTorch (.pte) or TensorRT engine file.")
    p.add_argument("model", metavar="MODEL",
                   help="train.py checkpoint, TorchScript, ONNX, .pt2, ExecuTorch .pte or TensorRT .engine file; class names and preprocessing "
                        "are read from it")
    p.add_argument("images", metavar="IMAGE", nargs="+",
                   help="image files, folders (searched recursively) or quoted glob patterns such as 'photos/**/*.jpg'")

    add_predict_arguments(p)  # --threshold, --no-calibration, --tta
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default: 5, capped at the class count)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the predictions as JSON to FILE")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="also write the predictions as CSV to FILE (file, answer, class_1, prob_1, ...)")
    add_run_arguments(p)
    return p


def resolve_threshold(value: str | None, model: LoadedModel) -> float | None:
    """``--threshold``: None, a probability, or ``auto`` (the model's stored threshold, an error if it has none)."""
    if value is None:
        return None
    if value == "auto":
        thr = (model.calibration or {}).get("threshold")
        if thr is None:
            raise UserError(f"--threshold auto: {model.path} carries no reject threshold; fit one with "
                            "`python evaluate.py CHECKPOINT val --write-calibration` (train.py stores one in best.pt) "
                            "and export again, or pass a number such as --threshold 0.9")
        return float(thr)
    try:
        thr = float(value)
    except ValueError:
        thr = -1.0
    if not 0.0 <= thr <= 1.0:
        raise UserError(f"--threshold must be 'auto' or a probability between 0 and 1, got '{value}'")
    return thr


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    for flag, out in (("--json", args.json), ("--csv", args.csv)):
        if out and os.path.isdir(out):  # checked before the work: the file is written after every prediction
            raise UserError(f"{flag} {out} is a folder; pass a file name, e.g. "
                            f"{os.path.join(out, 'preds' + flag.replace('--', '.'))}")
    paths, unmatched = expand_image_args(args.images)
    for item in unmatched:
        print(f"skipped {item}: {NOT_FOUND}", file=sys.stderr)
    if not paths:
        raise UserError(f"no images found in {', '.join(args.images)}; pass image files, folders or glob patterns")
    model = open_model(args.model, device=args.device, threads=args.threads)
    threshold = resolve_threshold(args.threshold, model)
    stored_t = (model.calibration or {}).get("temperature")
    temperature = 1.0 if args.no_calibration or stored_t is None else float(stored_t)
    result = predict_files(model, paths, topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                           progress=not args.no_progress, temperature=temperature, threshold=threshold, tta=args.tta)
    result.update(temperature=temperature, threshold=threshold, unmatched=unmatched)
    SkippedFiles().add(result["failed"])  # one line each on stderr
    n = len(result["predictions"])
    if n == 0:  # before --json / --csv: no file of headers alone that looks like a finished run
        raise UserError(f"none of the {len(paths)} files could be read as images; see the messages above")
    print(format_table(result["predictions"]))
    if args.json:
        write_predictions_json(args.json, result, model)
    if args.csv:
        write_predictions_csv(args.csv, result)
    print(model.engine_line())
    if args.no_calibration or stored_t is None:
        how = "plain softmax" + ("" if args.no_calibration else
                                 f" ({os.path.basename(model.path)} carries no temperature; see docs/trust.md)")
    else:
        how = f"calibrated, temperature {temperature:.3f}"
    unknown = sum(p["answer"] == "unknown" for p in result["predictions"])
    print(f"probabilities: {how}" + ("" if threshold is None else
                                     f"; threshold {threshold:.4f}: {unknown}/{n} answered unknown"))
    written = "".join(f", wrote {f}" for f in (args.json, args.csv) if f)
    skipped = len(result["failed"]) + len(unmatched)
    print(f"{model.kind} {os.path.basename(model.path)}: {n} image{plural_s(n)} predicted"
          f"{f', {skipped} skipped' if skipped else ''} in {result['seconds']:.2f} s, "
          f"{rate_text(result['images_per_s'])} images/s (model alone {rate_text(result['model_images_per_s'])} images/s, "
          f"{model.engine.value} on {model.runs_on}){written}")
    return result


if __name__ == "__main__":
    run_main(main)
