"""Classify images with a checkpoint, TorchScript, ONNX or TensorRT engine file; print the top-k classes per image.

    python predict.py runs/fmnist/best.pt photo.jpg
    python predict.py runs/fmnist/export/model.onnx photos/ 'more/**/*.png' --topk 3 --json preds.json

Class names and preprocessing come from the model file. Unreadable files are reported and skipped.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of busy-waiting, so DataLoader decode workers (and other jobs) get the
# cores: measured 20 vs 3 images/s (predict, 224 px) and 1134 vs 753 (evaluate, 32 px) on a busy 2-core CPU.
# Only takes effect before torch is imported; a value the user set wins; importing this module changes nothing.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import csv
import io
import json
import sys
from typing import Any

from utils.checkpoint import atomic_write
from utils.data import SkippedFiles
from utils.errors import UserError, run_main
from utils.inference import as_records, default_workers, expand_image_args, run_on_files
from utils.runtime import LoadedModel, open_model


def predict_files(model: LoadedModel, paths: list[str], topk: int = 5, batch_size: int = 64,
                  workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Top-k predictions for every readable file: ``{"predictions": [...], "failed": [...], ...speed}``.

    Each prediction is ``{"file", "top": [{"class", "prob"}, ...]}`` in input order.
    """
    res = run_on_files(model, paths, batch_size=batch_size, workers=workers, desc="predict", progress=progress)
    k = min(topk, model.num_classes)
    probs = res.logits.softmax(dim=1)
    p, idx = probs.topk(k, dim=1) if len(probs) else (probs, probs.long())
    preds = [{"file": paths[int(i)], "top": [{"class": model.classes[int(c)], "prob": float(q)}
                                             for c, q in zip(idx[row], p[row])]}
             for row, i in enumerate(res.indices)]
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
    cw = [max(len(f"top-{j + 1}"), *(len(c[j]) for c in cells)) for j in range(k)]
    head = f"{'file':<{fw}}  " + "  ".join(f"{f'top-{j + 1}':<{cw[j]}}" for j in range(k))
    lines = prefix + [head, "-" * len(head)]
    for f, c in zip(files, cells):
        shown = f if len(f) <= fw else "..." + f[-(fw - 3):]
        lines.append(f"{shown:<{fw}}  " + "  ".join(f"{c[j]:<{cw[j]}}" for j in range(k)))
    return "\n".join(lines)


def write_json(path: str, result: dict[str, Any], model: LoadedModel) -> None:
    doc = {"model": model.path, "kind": model.kind, "engine": model.engine.value,
           "predictions": result["predictions"],
           "skipped": as_records(result["failed"])}
    atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(doc, indent=2) + "\n"))


def write_csv(path: str, result: dict[str, Any]) -> None:
    """Wide CSV: file, class_1, prob_1, ..., class_k, prob_k (one row per readable image)."""
    preds = result["predictions"]
    k = len(preds[0]["top"]) if preds else 0
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file"] + [h for j in range(1, k + 1) for h in (f"class_{j}", f"prob_{j}")])
    for p in preds:
        w.writerow([p["file"]] + [v for t in p["top"] for v in (t["class"], f"{t['prob']:.6f}")])
    atomic_write(path, lambda tmp: open(tmp, "w", newline="").write(buf.getvalue()))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Print the top-k classes of each image for a checkpoint, TorchScript, ONNX, torch.export (.pt2), "
                    "ExecuTorch (.pte) or TensorRT engine file.")
    p.add_argument("model", metavar="MODEL",
                   help="train.py checkpoint, TorchScript, ONNX, .pt2, ExecuTorch .pte or TensorRT .engine file; class names and preprocessing "
                        "are read from it")
    p.add_argument("images", metavar="IMAGE", nargs="+",
                   help="image files, folders (searched recursively) or quoted glob patterns such as 'photos/**/*.jpg'")
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default: 5, capped at the class count)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the predictions as JSON to FILE")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="also write the predictions as CSV to FILE (file, class_1, prob_1, ...)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"DataLoader worker processes decoding images (default: {default_workers()}; 0 = main process)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the model runtime (default: the runtime's own choice, about one per "
                        "core; on a machine busy with other jobs 1 can be faster)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch has it, else cpu; a TensorRT engine always "
                        "runs on a GPU, cuda:0 by default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    paths, unmatched = expand_image_args(args.images)
    for item in unmatched:
        print(f"skipped {item}: no such file, or no images in that folder / matching that pattern", file=sys.stderr)
    if not paths:
        raise UserError(f"no images found in {', '.join(args.images)}; pass image files, folders or glob patterns")
    model = open_model(args.model, device=args.device, threads=args.threads)
    result = predict_files(model, paths, topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                           progress=not args.no_progress)
    SkippedFiles().add(result["failed"])  # one line each on stderr
    if result["predictions"]:
        print(format_table(result["predictions"]))
    if args.json:
        write_json(args.json, result, model)
    if args.csv:
        write_csv(args.csv, result)
    print(model.engine_line())
    n = len(result["predictions"])
    written = "".join(f", wrote {f}" for f in (args.json, args.csv) if f)
    skipped = len(result["failed"]) + len(unmatched)
    print(f"{model.kind} {os.path.basename(model.path)}: {n} images predicted"
          f"{f', {skipped} skipped' if skipped else ''} in {result['seconds']:.2f} s, "
          f"{result['images_per_s']:.0f} images/s (model alone {result['model_images_per_s']:.0f} images/s, "
          f"{model.engine.value} on {model.runs_on}){written}")
    if n == 0:
        raise UserError(f"none of the {len(paths)} files could be read as images; see the messages above")
    return result


if __name__ == "__main__":
    run_main(main)
