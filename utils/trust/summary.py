"""How far to trust a model's answers on a labelled folder: intervals, calibration and the reject option together.

evaluate.py calls :func:`assess` on the logits of the images it evaluated and :func:`write_trust_files` for
reliability.png, coverage.png and coverage.csv; see docs/trust.md.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import torch

from utils.deploy.int8_check import wilson_interval
from utils.errors import UserError
from utils.files import atomic_write
from utils.trust.calibration import calibrated_probs, calibration_report, fit_temperature, plot_reliability
from utils.trust.reject import (
    DEFAULT_TARGET_ACCURACY,
    TARGET_ACCURACY_RULE,
    apply_threshold,
    check_target_accuracy,
    coverage_curve,
    plot_coverage,
    threshold_for_accuracy,
)
from utils.trust.uncertainty import ci_text, metric_intervals

CALIBRATION_MODES = ("auto", "stored", "fit", "none")


def choose_temperature(logits: torch.Tensor, target: torch.Tensor, stored: dict[str, Any] | None,
                       mode: str) -> tuple[float, str]:
    """The temperature to report with and where it comes from.

    ``auto``: the model's stored temperature, else one fitted on these images; ``stored``: the model's (error if
    none); ``fit``: fitted on these images (optimistic for them); ``none``: 1 (plain softmax).
    """

    if mode not in CALIBRATION_MODES:
        raise UserError(f"--calibration must be one of {', '.join(CALIBRATION_MODES)}, got '{mode}'")
    if mode == "none":
        return 1.0, "none (plain softmax)"
    if mode in ("auto", "stored") and stored:
        return float(stored["temperature"]), f"stored with the model (fitted on {stored.get('fitted_on', '?')})"
    if mode == "stored":
        raise UserError("--calibration stored: the model carries no temperature; fit one with evaluate.py "
                        "CHECKPOINT val --write-calibration (train.py stores one in best.pt)")
    return fit_temperature(logits, target), "fitted on these images, optimistic for them"


def assess(logits: torch.Tensor, target: torch.Tensor, labels: Sequence[int], names: Sequence[str],
           stored: dict[str, Any] | None, target_accuracy: float | None = None, mode: str = "auto") -> dict[str, Any]:
    """Intervals, calibration (ECE before/after) and the reject option for one evaluation.

    Returns ``{"intervals", "calibration", "reject", "curve", "confidence"}``; ``confidence`` is the calibrated
    top-1 probability per image (a tensor, not for JSON).
    """
    target_accuracy = DEFAULT_TARGET_ACCURACY if target_accuracy is None else target_accuracy
    pred = logits.argmax(dim=1)
    intervals = metric_intervals(target.tolist(), pred.tolist(), labels, names)
    temperature, source = choose_temperature(logits, target, stored, mode)
    cal = calibration_report(logits, target, temperature)
    cal["source"] = source
    conf = calibrated_probs(logits, temperature).max(dim=1).values
    correct = pred == target
    chosen = threshold_for_accuracy(conf, correct, target_accuracy)
    reject: dict[str, Any] = {"target_accuracy": target_accuracy, "fitted_here": chosen, "stored": None}
    if stored and stored.get("threshold") is not None:
        at = apply_threshold(conf, correct, float(stored["threshold"]))
        lo, hi = wilson_interval(at["correct"], at["accepted"])
        reject["stored"] = {**at, "accuracy_ci": [lo, hi], "target_accuracy": stored.get("target_accuracy")}
    return {"intervals": intervals, "calibration": cal, "reject": reject,
            "curve": coverage_curve(conf, correct), "confidence": conf}


def write_trust_files(trust: dict[str, Any], out_dir: str, title: str = "") -> dict[str, str]:
    """reliability.png, coverage.png and coverage.csv (threshold, coverage, accuracy, accepted) in ``out_dir``."""

    files = {k: os.path.join(out_dir, k) for k in ("reliability.png", "coverage.png", "coverage.csv")}
    plot_reliability(trust["calibration"], files["reliability.png"], title=title)
    rej = trust["reject"]
    plot_coverage(trust["curve"], rej["fitted_here"], rej["target_accuracy"], files["coverage.png"], title=title)
    text = "threshold,coverage,accuracy,accepted\n" + "".join(
        f"{r['threshold']:.6f},{r['coverage']:.6f},{r['accuracy']:.6f},{r['accepted']}\n" for r in trust["curve"])
    atomic_write(files["coverage.csv"], lambda tmp: open(tmp, "w").write(text))
    return files


def trust_lines(trust: dict[str, Any]) -> list[str]:
    """Terminal lines: intervals, ECE before/after, the threshold for the target accuracy and the stored one."""
    iv, cal, rej = trust["intervals"], trust["calibration"], trust["reject"]
    n = iv["n"]
    lines = ["95% intervals: " + ", ".join(
        [ci_text("top-1", iv["top1"], n), ci_text("balanced accuracy", iv["balanced_acc"], n),
         ci_text("macro-F1", iv["macro_f1"], n, percent=False)])]
    lines.append(f"calibration: ECE ({cal['ece_bins']} bins) {cal['ece_before']:.2f}% with the plain softmax -> "
                 f"{cal['ece_after']:.2f}% at temperature {cal['temperature']:.3f} - {cal['source']}")
    here, target = rej["fitted_here"], rej["target_accuracy"]
    if here["reachable"]:
        lines.append(f"reject option: answering only at calibrated confidence >= {here['threshold']:.4f} reaches "
                     f"{100 * target:g}% accuracy on {100 * here['coverage']:.1f}% of these images "
                     f"({here['accepted']}/{n}; threshold fitted on these images, optimistic for them)")
    else:
        lines.append(f"reject option: no confidence threshold reaches {100 * target:g}% accuracy on these images")
    st = rej["stored"]
    if st:
        acc = "n/a" if not st["accepted"] else f"{100 * st['accuracy']:.1f}%"
        lo, hi = st["accuracy_ci"]
        lines.append(f"stored threshold {st['threshold']:.4f}: answers {100 * st['coverage']:.1f}% of these images "
                     f"({st['accepted']}/{n}) with accuracy {acc} (95% CI {100 * lo:.1f}-{100 * hi:.1f}), the rest "
                     "'unknown'")
    return lines


def _target_accuracy(text: str) -> float:
    """--target-accuracy's type: checked when the command line is read, before a model is loaded."""
    try:
        return check_target_accuracy(float(text))
    except (ValueError, UserError):  # not a number, or out of range: argparse names the flag
        raise argparse.ArgumentTypeError(f"{TARGET_ACCURACY_RULE}; got {text}") from None


def add_trust_arguments(p) -> None:
    """evaluate.py's options for calibration, intervals, the reject option and TTA (an argparse group)."""
    t = p.add_argument_group("trust (docs/trust.md)")
    t.add_argument("--target-accuracy", type=_target_accuracy, default=DEFAULT_TARGET_ACCURACY,
                   help="accuracy the reject threshold must reach on the answered images (default: "
                        f"{DEFAULT_TARGET_ACCURACY:g}, i.e. at most 1 wrong answer in 100; the rest answer 'unknown')")
    t.add_argument("--calibration", choices=CALIBRATION_MODES, default="auto",
                   help="temperature for calibrated probabilities: auto = the one stored with the model, else "
                        "fitted on these images; stored; fit (on these images); none (plain softmax). Default: auto")
    t.add_argument("--write-calibration", action="store_true",
                   help="fit temperature and reject threshold on these images and store them in the checkpoint "
                        "(checkpoints only; export it again so the exported files carry them)")
    t.add_argument("--compare", default=None, metavar="MODEL_B",
                   help="also evaluate MODEL_B on the same images and report the paired 95%% interval of the "
                        "difference (MODEL minus MODEL_B), e.g. fp32 vs int8 or two runs")
    t.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the logits of each image and its mirror image (2x the cost)")


def add_predict_arguments(p) -> None:
    """predict.py's options for calibrated probabilities, the ``unknown`` answer and TTA (an argparse group)."""
    t = p.add_argument_group("trust (docs/trust.md)")
    t.add_argument("--threshold", default=None, metavar="auto|X",
                   help="answer 'unknown' when the calibrated top-1 probability is below X (0-1); auto = the "
                        "threshold stored with the model (evaluate.py/train.py fit it for a target accuracy). "
                        "Default: always answer the top-1 class")
    t.add_argument("--no-calibration", action="store_true",
                   help="show the plain softmax instead of probabilities calibrated with the model's stored "
                        "temperature")
    t.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each image with its mirror image (2x the cost)")
