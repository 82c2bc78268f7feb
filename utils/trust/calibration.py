"""Calibrated probabilities: temperature scaling, expected calibration error (ECE) and reliability data.

A fine-tuned network's softmax is usually over-confident. Temperature scaling (Guo et al., 2017) divides the
logits by one scalar ``T`` fitted on held-out images (minimum negative log-likelihood, a few LBFGS steps on
``log T``): the top-1 answer never changes, only how sure the probabilities are.

The fitted temperature and the reject threshold (utils/trust/reject.py) travel with the model as one JSON entry
``calibration`` (checkpoint key, ONNX ``metadata_props``, TorchScript ``_extra_files``, TensorRT sidecar)::

    {"temperature": 1.7, "threshold": 0.93, "target_accuracy": 0.99, "fitted_on": "DATA/val", "images": 2000, ...}
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from utils.checkpoint import CALIBRATION_KEY as KEY
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.data import scan_class_folders
from utils.deploy.inference import run_on_files
from utils.deploy.runtime import open_model
from utils.metrics import class_summary, confusion_counts
from utils.plots import Figure, _save_figure
from utils.trust.reject import threshold_for_accuracy

ECE_BINS = 15


LOG_T_PRIOR_SD = 1.0  # the N(0, 1) prior on log T of fit_temperature: T in [0.14, 7.4] at 95% before any data


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 50) -> float:
    """The temperature ``T`` minimising the cross-entropy of ``logits / T`` on ``target`` (LBFGS on log T), with a
    weak normal prior on log T (MAP): on a val set where every image is right, the cross-entropy alone keeps
    falling as T -> 0 and would make every later answer ~100% sure; the prior's weight is that of one image
    against the ``n`` of the set, so on a real val set (hundreds of images) T is the plain fit's.

    Bounded to [0.05, 20]; an empty set gives 1.0.
    """
    if len(target) == 0:
        return 1.0
    logits = logits.detach().double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
    prior = 1.0 / (2 * LOG_T_PRIOR_SD ** 2 * len(target))  # the mean cross-entropy is per image

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target) + prior * log_t.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return float(min(max(t, 0.05), 20.0)) if math.isfinite(t) else 1.0


def calibrated_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax of ``logits / temperature``."""
    return (logits.float() / float(temperature)).softmax(dim=1)


def reliability_bins(probs: torch.Tensor, target: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width confidence bins over (0, 1]: each ``{lo, hi, count, confidence, accuracy}`` (means, 0 if empty)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == target).double().numpy()
    conf_np = conf.double().numpy()
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin k holds lo < conf <= hi (the first bin also holds 0)
    which = np.clip(np.searchsorted(edges, conf_np, side="left") - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        sel = which == k
        n = int(sel.sum())
        out.append({"lo": float(edges[k]), "hi": float(edges[k + 1]), "count": n,
                    "confidence": float(conf_np[sel].mean()) if n else 0.0,
                    "accuracy": float(correct[sel].mean()) if n else 0.0})
    return out


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent: the image-weighted mean |accuracy - confidence| over ``bins`` equal-width bins."""
    rows = reliability_bins(probs, target, bins)
    n = sum(r["count"] for r in rows)
    if n == 0:
        return 0.0
    return 100.0 * sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / n


def calibration_report(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> dict[str, Any]:
    """ECE and reliability bins before (T = 1) and after temperature scaling with ``temperature``."""
    before, after = calibrated_probs(logits, 1.0), calibrated_probs(logits, temperature)
    nll = (lambda p: float(torch.nn.functional.nll_loss(p.clamp_min(1e-12).log(), target)) if len(target) else 0.0)
    return {"temperature": float(temperature), "ece_bins": ECE_BINS,
            "ece_before": expected_calibration_error(before, target), "ece_after": expected_calibration_error(after, target),
            "nll_before": nll(before), "nll_after": nll(after),
            "reliability_before": reliability_bins(before, target), "reliability_after": reliability_bins(after, target)}


def plot_reliability(report: dict[str, Any], out_png: str, title: str = "") -> None:
    """Reliability diagram: accuracy per confidence bin before and after temperature scaling, plus counts."""
    fig = Figure(figsize=(6.4, 5.6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for key, colour, label in (("before", "tab:red", f"softmax (ECE {report['ece_before']:.2f}%)"),
                               ("after", "tab:blue", f"T = {report['temperature']:.2f} (ECE {report['ece_after']:.2f}%)")):
        rows = [r for r in report[f"reliability_{key}"] if r["count"]]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", color=colour, label=label)
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"reliability diagram ({report['ece_bins']} bins)", fontsize=9)
    centres = [(r["lo"] + r["hi"]) / 2 for r in report["reliability_after"]]
    width = 1.0 / len(centres)
    hist.bar(centres, [r["count"] for r in report["reliability_before"]], width=width * 0.45, align="edge",
             color="tab:red", alpha=0.6, label="softmax")
    hist.bar([c - width * 0.45 for c in centres], [r["count"] for r in report["reliability_after"]],
             width=width * 0.45, align="edge", color="tab:blue", alpha=0.6, label="calibrated")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    _save_figure(fig, out_png)


def write_calibration_to_checkpoint(path: str, calibration: dict[str, Any]) -> None:
    """Store ``calibration`` as the checkpoint's ``calibration`` entry (atomic rewrite of the file)."""
    ckpt = load_checkpoint(path)
    ckpt[KEY] = dict(calibration)
    save_checkpoint(path, ckpt)


def calibrate_checkpoint(ckpt_path: str, val_dir: str, target_accuracy: float, workers: int | None = 0,
                         progress: bool = False, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit temperature and reject threshold of a checkpoint on ``val_dir`` (class folders) and store them in it.

    train.py calls this on best.pt at the end of training. Returns the stored entry, and what the same fp32 pass
    scored (not stored): ``top1`` and ``balanced_acc`` in percent and the ``engine`` that ran it, i.e. what
    evaluate.py and export.py will report for these images, whatever precision training validated in.
    ``device``: where the pass runs (train.py: its own device, so a GPU run does not wait for a CPU pass).
    """
    model = open_model(ckpt_path, device=device)
    per_class, _ = scan_class_folders(val_dir)
    index = {c: i for i, c in enumerate(model.classes)}
    paths = [p for c in per_class if c in index for p in per_class[c]]
    labels = torch.tensor([index[c] for c in per_class if c in index for _ in per_class[c]], dtype=torch.long)
    res = run_on_files(model, paths, workers=workers, desc="calibrate", progress=progress)
    target = labels[res.indices]
    entry = fit_calibration(res.logits, target, target_accuracy, fitted_on=os.path.abspath(val_dir))
    write_calibration_to_checkpoint(ckpt_path, entry)
    k = len(model.classes)
    pred = res.logits.argmax(dim=1)
    cm = confusion_counts(target, pred, k).reshape(k, k).numpy()
    scores = {"top1": 100.0 * float((pred == target).float().mean()) if len(target) else 0.0,
              "balanced_acc": class_summary(cm)["balanced_acc"], "engine": model.engine.value}
    return entry, scores


def fit_calibration(logits: torch.Tensor, target: torch.Tensor, target_accuracy: float,
                    fitted_on: str) -> dict[str, Any]:
    """The ``calibration`` entry a model carries: temperature, reject threshold and what they were fitted on."""

    t = fit_temperature(logits, target)
    rep = calibration_report(logits, target, t)
    conf, pred = calibrated_probs(logits, t).max(dim=1)
    thr = threshold_for_accuracy(conf, pred == target, target_accuracy)
    return {"temperature": t, "threshold": thr["threshold"], "target_accuracy": float(target_accuracy),
            "coverage": thr["coverage"], "fitted_on": fitted_on, "images": int(len(target)),
            "ece_before": rep["ece_before"], "ece_after": rep["ece_after"]}
