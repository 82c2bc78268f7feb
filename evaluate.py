"""Evaluate a checkpoint, TorchScript, ONNX or TensorRT engine file on a labelled image folder.

    python evaluate.py runs/fmnist/best.pt val                 # split name of the run -> runs/fmnist/eval/
    python evaluate.py runs/fmnist/export/model.onnx DATA/test --out eval_onnx
    python evaluate.py runs/fmnist/export/model.int8.pte DATA/val          # the phone file, on ExecuTorch's runtime

Reports top-1, top-5, balanced accuracy (mean per-class recall), macro-F1, mean loss and per-class
precision/recall/F1/support, and writes metrics.json, per_class.csv, confusion_matrix.csv/.png, mistakes.csv
and mistakes.png into the output folder. Trust (docs/trust.md): 95% intervals, calibration (ECE before
and after temperature scaling, reliability.png), the reject option (coverage.png/.csv, the threshold for
--target-accuracy) and report.html, one self-contained page with all of it.
Class names and preprocessing always come from the model file itself.
"""
from __future__ import annotations

from utils.process import configure_process  # imports nothing that loads torch

if __name__ == "__main__":
    configure_process("infer")  # idle OpenMP threads sleep (utils/process.py); must precede torch

import argparse
import csv
import io
import json
import os
import unicodedata
from typing import Any

import numpy as np
import torch
import yaml

from utils.data import SkippedFiles, is_image_file, scan_class_folders
from utils.deploy.inference import add_run_arguments, as_records, run_on_files
from utils.deploy.runtime import LoadedModel, open_model
from utils.errors import UserError, run_main
from utils.files import REPO_ROOT, write_text
from utils.log import plural_s, rate_text
from utils.metrics import class_summary, confusion_matrix, macro_average, per_class_report, topk_correct
from utils.plots import plot_confusion_matrix, plot_mistakes
from utils.trust.calibration import fit_calibration, write_calibration_to_checkpoint
from utils.trust.report import write_report
from utils.trust.summary import add_trust_arguments, assess, trust_lines, write_trust_files
from utils.trust.tta import with_flip_tta
from utils.trust.uncertainty import ci_text, paired_difference

SPLIT_NAMES = ("train", "val", "test")



def training_config(model: LoadedModel) -> dict[str, Any]:
    """The run's training config: the checkpoint's own, or for an export in RUN/export/ the run's config.yaml."""
    if model.config:
        return model.config
    folder = os.path.dirname(os.path.abspath(model.path))
    for cfg_path in (os.path.join(folder, "config.yaml"), os.path.join(os.path.dirname(folder), "config.yaml")):
        if os.path.isfile(cfg_path):

            try:
                with open(cfg_path) as f:
                    cfg = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(cfg, dict):
                return cfg
    return {}


def resolve_data(data: str, model: LoadedModel) -> str:
    """``data`` is a split folder, or a split name resolved against the run's training data folder."""
    if os.path.isdir(data) or data not in SPLIT_NAMES:
        return data
    root = training_config(model).get("data")
    if not root:
        raise UserError(f"'{data}' is a split name, but neither {model.path} nor a config.yaml next to it says where "
                        f"the training data is; pass the split folder itself (e.g. DATA/{data})")
    candidates = [root] if os.path.isabs(root) else [root, os.path.join(REPO_ROOT, root)]
    for base in candidates:
        if os.path.isdir(os.path.join(base, data)):
            return os.path.join(base, data)
    raise UserError(f"split '{data}' not found: {model.path} was trained on data folder '{root}', which has no "
                    f"'{data}' sub-folder here; pass the split folder path instead")


def same_name(name: str) -> str:
    """A class name as compared with the model's: Unicode NFC, so a folder ``café`` written by macOS (NFD: ``e`` +
    combining accent) matches the model's ``café`` typed on Linux; the two look identical in every message."""
    return unicodedata.normalize("NFC", name)


def match_classes(data_classes: list[str], model: LoadedModel, data_dir: str) -> list[str]:
    """Check the data's class folders against the model's classes; return notes for a subset.

    A class folder the model does not know is an error listing every difference.
    """
    known, present = {same_name(c) for c in model.classes}, {same_name(d) for d in data_classes}
    unknown = [c for c in data_classes if same_name(c) not in known]
    absent = [c for c in model.classes if same_name(c) not in present]
    if unknown and set(unknown) & set(SPLIT_NAMES):
        split = next(c for c in ("val", "test", "train") if c in unknown)
        raise UserError(f"{data_dir} holds split folders ({', '.join(c for c in unknown if c in SPLIT_NAMES)}), "
                        f"not class folders; pass one split, e.g. {os.path.join(data_dir, split)}")
    if unknown:
        msg = (f"class folders in {data_dir} differ from the classes of {model.path}: "
               f"not known to the model: {', '.join(unknown)}")
        if absent:
            shown = ", ".join(absent[:20]) + (f" (+{len(absent) - 20} more)" if len(absent) > 20 else "")
            msg += f"; model classes without a folder: {shown}"
        msg += "; evaluate with data split the same way as for training, or remove the unknown folders"
        raise UserError(msg)
    if absent:
        shown = ", ".join(absent[:20]) + (f" (+{len(absent) - 20} more)" if len(absent) > 20 else "")
        return [f"note: {data_dir} has {len(data_classes)} of the model's {len(model.classes)} classes "
                f"(evaluating that subset; not in the data: {shown})"]
    return []


def default_out_dir(model_path: str, kind: str) -> str:
    """RUN/best.pt -> RUN/eval; another checkpoint RUN/x.pt -> RUN/eval_x; an export f.onnx -> its folder/eval_f_onnx."""
    folder = os.path.dirname(model_path)
    name = os.path.basename(model_path)
    if kind == "checkpoint":
        stem = os.path.splitext(name)[0]
        return os.path.join(folder, "eval" if stem == "best" else f"eval_{stem}")
    return os.path.join(folder, "eval_" + name.replace(".", "_"))


def evaluate(model: LoadedModel, data_dir: str, batch_size: int = 64, workers: int | None = None,
             progress: bool = True, target_accuracy: float | None = None, calibration: str = "auto",
             tta: bool = False) -> dict[str, Any]:
    """Run ``model`` over every image of ``data_dir`` and compute all metrics (nothing is written).

    ``calibration`` picks the temperature (utils.trust.summary.choose_temperature), ``target_accuracy`` the reject
    threshold's goal (default utils.trust.reject.DEFAULT_TARGET_ACCURACY), ``tta`` averages the logits of each image
    and its mirror image (utils.trust.tta)."""
    if tta:

        model = with_flip_tta(model)
    per_class, empty = scan_class_folders(data_dir)
    notes = match_classes(list(per_class), model, data_dir)
    spelled = {same_name(c): c for c in model.classes}  # the model's spelling from here on
    per_class = {spelled[same_name(c)]: files for c, files in per_class.items()}
    if empty:
        notes.append(f"note: class folders without images ignored: {', '.join(empty)}")
    loose = [f for f in sorted(os.listdir(data_dir)) if is_image_file(f) and os.path.isfile(os.path.join(data_dir, f))]
    if loose:  # no label: not counted (predict.py takes unlabelled images)
        notes.append(f"note: {len(loose)} image(s) directly in {data_dir}, outside any class folder, ignored "
                     f"({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''})")
    index = {c: i for i, c in enumerate(model.classes)}
    paths = [p for c in per_class for p in per_class[c]]
    targets_all = torch.tensor([index[c] for c in per_class for _ in per_class[c]], dtype=torch.long)

    res = run_on_files(model, paths, batch_size=batch_size, workers=workers, desc="evaluate", progress=progress)
    if len(res.indices) == 0:
        raise UserError(f"none of the {len(paths)} images in {data_dir} could be read; check the files "
                        f"(first error: {res.failed[0][1] if res.failed else 'none'})")
    target = targets_all[res.indices]
    logits = res.logits
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    n = len(target)
    top1, top5 = topk_correct(logits, target, ks=(1, 5))
    loss = float(torch.nn.functional.cross_entropy(logits, target))
    # train.py logs val_loss with its training criterion; give that number too so the two can be compared.
    smoothing = float(training_config(model).get("label_smoothing") or 0.0)
    loss_smoothed = float(torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing))

    # Rows/columns: classes present in the data plus any class the model predicted (model order).
    labels = sorted(set(target.tolist()) | set(pred.tolist()))
    names = [model.classes[i] for i in labels]
    cm = confusion_matrix(target.tolist(), pred.tolist(), labels)
    rows = per_class_report(target.tolist(), pred.tolist(), labels, model.classes)
    macro = macro_average(rows)
    balanced = class_summary(cm)  # the same computation as train.py's val_bal_acc / val_macro_f1

    wrong = (pred != target).nonzero().flatten().tolist()
    mistakes = [{"file": paths[int(res.indices[k])], "true": model.classes[int(target[k])],
                 "predicted": model.classes[int(pred[k])], "confidence": float(conf[k]),
                 "true_class_prob": float(probs[k, target[k]])} for k in wrong]
    mistakes.sort(key=lambda m: -m["confidence"])
    trust = assess(logits, target, labels, model.classes, model.calibration, target_accuracy, calibration)
    for m, k in zip(mistakes, sorted(wrong, key=lambda k: -float(conf[k]))):
        m["calibrated_confidence"] = float(trust["confidence"][k])

    metrics = {
        "model": model.path, "kind": model.kind, "data": data_dir, "device": model.device.type,
        "runs_on": model.runs_on, "engine": model.engine.value, "engine_reason": model.engine.reason,
        "images": n, "skipped": len(res.failed),
        "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss,
        "label_smoothing": smoothing, "loss_label_smoothed": loss_smoothed,
        "balanced_acc": balanced["balanced_acc"],
        "macro_precision": macro["precision"], "macro_recall": macro["recall"], "macro_f1": macro["f1"],
        "mistakes": len(mistakes),
        "classes_in_data": list(per_class), "model_classes_not_in_data": [c for c in model.classes if c not in per_class],
        "images_per_s": res.images_per_s, "model_images_per_s": res.model_images_per_s, "seconds": res.seconds,
        "batch_size": batch_size, "preprocess": model.preprocess,
        "per_class": rows, "skipped_files": as_records(res.failed), "notes": notes,
        "tta": "hflip" if tta else None, "intervals": trust["intervals"], "calibration": trust["calibration"],
        "reject": trust["reject"],
    }
    return {"metrics": metrics, "cm": cm, "cm_names": names, "per_class": rows, "mistakes": mistakes,
            "failed": res.failed, "notes": notes, "trust": trust, "logits": logits, "target": target,
            "files": [paths[int(i)] for i in res.indices], "labels": labels}


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_outputs(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Write every output file atomically into ``out_dir``; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    files = {k: os.path.join(out_dir, k) for k in ("metrics.json", "per_class.csv", "confusion_matrix.csv",
                                                    "confusion_matrix.png", "mistakes.csv", "mistakes.png")}
    m = result["metrics"]
    write_text(files["metrics.json"], json.dumps(m, indent=2) + "\n")
    write_text(files["per_class.csv"], _csv_text(
        ["class", "precision", "recall", "f1", "support"],
        [[r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
         for r in result["per_class"]]))
    names, cm = result["cm_names"], np.asarray(result["cm"])
    write_text(files["confusion_matrix.csv"], _csv_text(
        ["true\\predicted"] + names, [[names[i]] + cm[i].tolist() for i in range(len(names))]))
    title = f"{os.path.basename(m['model'])} on {m['data']}: top-1 {m['top1']:.2f}% ({m['images']} images)"
    plot_confusion_matrix(cm, names, files["confusion_matrix.png"], title=title)
    write_text(files["mistakes.csv"], _csv_text(
        ["file", "true", "predicted", "confidence", "calibrated_confidence", "true_class_prob"],
        [[r["file"], r["true"], r["predicted"], f"{r['confidence']:.4f}", f"{r['calibrated_confidence']:.4f}",
          f"{r['true_class_prob']:.4f}"] for r in result["mistakes"]]))
    plot_mistakes(result["mistakes"], files["mistakes.png"])

    files.update(write_trust_files(result["trust"], out_dir, title=title))

    files["report.html"] = write_report(result, files, os.path.join(out_dir, "report.html"))
    return files


def format_report(result: dict[str, Any]) -> str:
    """Per-class table plus the summary line, for the terminal."""
    rows = result["per_class"]
    width = max([len("class")] + [len(r["class"]) for r in rows])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for r in rows:
        # A class the model predicted but the data has no image of: its recall is undefined, not 0, and the
        # macro average leaves it out.
        recall, f1 = (f"{r['recall']:6.3f}", f"{r['f1']:5.3f}") if r["support"] else (f"{'-':>6}", f"{'-':>5}")
        lines.append(f"{r['class']:<{width}}  {r['precision']:9.3f}  {recall}  {f1}  {r['support']:7d}")
    m = result["metrics"]
    lines.append(f"{'macro avg':<{width}}  {m['macro_precision']:9.3f}  {m['macro_recall']:6.3f}  "
                 f"{m['macro_f1']:5.3f}  {m['images']:7d}")
    absent = [r["class"] for r in rows if not r["support"]]
    if absent:
        lines.append(f"-: no image of {', '.join(absent)} in the data (only predicted), so no recall; "
                     f"the macro average is over the {len(rows) - len(absent)} classes with images")
    return "\n".join(lines)


def summary_line(m: dict[str, Any]) -> str:
    skipped = f", {m['skipped']} unreadable skipped" if m["skipped"] else ""
    smoothed = (f" ({m['loss_label_smoothed']:.4f} with label smoothing {m['label_smoothing']:g}, as train.py logs it)"
                if m["label_smoothing"] else "")
    top1 = f"top-1 {m['top1']:.2f}%"
    if m.get("intervals"):

        top1 = ci_text("top-1", m["intervals"]["top1"], m["intervals"]["n"])
    return (f"{m['kind']} {m['model']} on {m['data']}: {top1}  top-5 {m['top5']:.2f}%  "
            f"loss {m['loss']:.4f}{smoothed}  balanced accuracy {m['balanced_acc']:.2f}%  macro-F1 {m['macro_f1']:.4f}  "
            f"| {m['images']} image{plural_s(m['images'])}{skipped} in "
            f"{m['seconds']:.1f} s, {rate_text(m['images_per_s'])} images/s (model alone "
            f"{rate_text(m['model_images_per_s'])} images/s, "
            f"{m['engine']} on {m['runs_on']})")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a model file on a labelled ImageFolder split: top-1/top-5, loss, per-class "
                    "precision/recall/F1, confusion matrix and the most confident mistakes.")
    p.add_argument("model", metavar="MODEL",
                   help="train.py checkpoint (RUN/best.pt), TorchScript, ONNX, .pt2, ExecuTorch .pte or TensorRT .engine file (export.py "
                        "output); class names and preprocessing are read from it")
    p.add_argument("data", metavar="DATA",
                   help="split folder with one sub-folder per class (e.g. DATA/val), or a split name "
                        "(train, val, test) of the run's training data folder (from the checkpoint's config, "
                        "or RUN/config.yaml for files in RUN/export/)")

    add_trust_arguments(p)  # --target-accuracy, --calibration, --write-calibration, --compare, --tta
    p.add_argument("--out", default=None,
                   help="output folder (default: RUN/eval for RUN/best.pt, RUN/eval_<name> for other "
                        "checkpoints, <folder>/eval_<file name> for exported files)")
    add_run_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    model = open_model(args.model, device=args.device, threads=args.threads)
    data_dir = resolve_data(args.data, model)
    out_dir = args.out or default_out_dir(args.model, model.kind)
    print(f"model: {model.describe()}")
    if args.write_calibration and model.kind != "checkpoint":
        raise UserError(f"--write-calibration stores the fit in a checkpoint, but {args.model} is a {model.kind} "
                        "file; fit on the checkpoint, then export it again")
    result = evaluate(model, data_dir, batch_size=args.batch_size, workers=args.workers,
                      progress=not args.no_progress, target_accuracy=args.target_accuracy,
                      calibration="fit" if args.write_calibration else args.calibration, tta=args.tta)
    if args.compare:
        result["metrics"]["compare"] = compare_models(result, model, args, data_dir)
    for line in result["notes"]:
        print(line)
    SkippedFiles().add(result["failed"])  # one line each on stderr; metrics.json lists them too
    files = write_outputs(result, out_dir)
    print(format_report(result))
    print(model.engine_line())
    print(f"wrote {out_dir}/: " + ", ".join(os.path.basename(f) for f in files.values()))
    print(f"confusion matrix: {files['confusion_matrix.png']}")

    for line in trust_lines(result["trust"]):
        print(line)
    if args.write_calibration:

        entry = fit_calibration(result["logits"], result["target"], args.target_accuracy, fitted_on=data_dir)
        write_calibration_to_checkpoint(args.model, entry)
        print(f"stored temperature {entry['temperature']:.3f} and threshold {entry['threshold']:.4f} in {args.model}")
    if args.compare:
        c = result["metrics"]["compare"]
        diffs = "; ".join(f"{name} {c[k]['value']:+.2f} points (95% CI {c[k]['ci'][0]:+.2f} to {c[k]['ci'][1]:+.2f})"
                          for k, name in (("top1", "top-1"), ("balanced_acc", "balanced accuracy")))
        first, second = model_labels(args.model, args.compare)
        print(f"compare: {first} minus {second} on the same {c['n']} "
              f"images: {diffs}; only the first right on {c['only_a_right']}, only the second on {c['only_b_right']}")
    print(summary_line(result["metrics"]))
    return result["metrics"]


def model_labels(first: str, second: str) -> tuple[str, str]:
    """Short names for two model files: their file names, or with their folder when the file names are the same
    (two runs' best.pt)."""
    a, b = os.path.basename(first), os.path.basename(second)
    if a != b:
        return a, b
    return (os.path.join(os.path.basename(os.path.dirname(os.path.abspath(first))), a),
            os.path.join(os.path.basename(os.path.dirname(os.path.abspath(second))), b))


def compare_models(result: dict[str, Any], model: LoadedModel, args: argparse.Namespace,
                   data_dir: str) -> dict[str, Any]:
    """Evaluate ``args.compare`` on the same images and return the paired difference (first minus second)."""

    other = open_model(args.compare, device=args.device, threads=args.threads)
    if list(other.classes) != list(model.classes):
        raise UserError(f"--compare {args.compare} has other classes than {args.model}; compare models of one run")
    res_b = evaluate(other, data_dir, batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
                     tta=args.tta)
    pred_b = dict(zip(res_b["files"], res_b["logits"].argmax(1).tolist()))
    keep = [k for k, f in enumerate(result["files"]) if f in pred_b]
    target = result["target"][keep].tolist()
    pred_a = result["logits"].argmax(1)[keep].tolist()
    diff = paired_difference(target, pred_a, [pred_b[result["files"][k]] for k in keep], result["labels"])
    return {"model_b": args.compare, **diff}


if __name__ == "__main__":
    run_main(main)
