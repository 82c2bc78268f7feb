"""Structured channel pruning of the expanded layers, a short fine-tune, and a before/after report.

    python prune.py RUN/best.pt --ratio 0.4 --steps 300      # -> RUN/pruned/{pruned.pt, prune.json}
    python export.py RUN/pruned/pruned.pt                           # export/verify it like any checkpoint

What is removed: whole channels of every 1x1 convolution that feeds a depthwise convolution (the expanded
"hidden" channels of MobileNetV2/V3 inverted residuals; the pointwise outputs of MobileNetV1), together with
everything that depends on them (BatchNorm, the depthwise conv, squeeze-excitation, the projection's input).
``torch-pruning`` traces those dependencies; channels are ranked by the L2 norm of their weights and kept in
multiples of 8 so the smaller convolutions stay on fast kernels. The result has really fewer MACs and
parameters (unlike ``torch.nn.utils.prune`` masks, which keep every multiply).

How a pruned network is stored: a normal checkpoint (COMMON format) whose state dict has the smaller shapes
plus a ``"pruned"`` entry. ``build_model(**arch)`` still builds the full-width network; loading resizes each
Conv/BatchNorm/Linear to the shapes found in the state dict (:func:`shrink_to_state_dict`), which
``utils.checkpoint.model_from_checkpoint`` does whenever ``"pruned"`` is present. So ``export.py``,
``evaluate.py`` and ``predict.py`` take a pruned checkpoint like any other, and its ONNX/TorchScript
exports are self-contained.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from models import count_macs, count_params
from utils.checkpoint import load_checkpoint, model_from_checkpoint, pruned_state, save_checkpoint
from utils.config import augment_settings, from_checkpoint
from utils.data import SkippedFiles, list_labelled_images, load_data
from utils.data.transforms import resize_mode_of
from utils.deploy.export import batched_logits, evenly_spaced, export_onnx, read_images, top1_percent
from utils.deploy.onnx_io import INPUT_NAME, onnx_session
from utils.errors import UserError
from utils.files import write_json
from utils.schedule import WarmupCosine, build_optimizer
from utils.timing import interleaved_timings, load_average, median
from utils.train_loop import EpochProgress, StepContext, Trainable, epoch_seed, train_one_epoch

if TYPE_CHECKING:
    from utils.config import TrainConfig
    from utils.data import SkippedFiles


# --------------------------------------------------------------------------------------------- pruning
def expansion_convs(model: nn.Module) -> list[nn.Conv2d]:
    """1x1 convolutions whose output goes straight into a depthwise convolution (their channel count)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return [a for a, b in zip(convs, convs[1:])
            if a.kernel_size == (1, 1) and a.groups == 1 and b.groups > 1
            and b.groups == b.in_channels == a.out_channels]


def prune_expanded_channels(model: nn.Module, ratio: float, img_size: int, round_to: int = 8) -> nn.Module:
    """Remove ``ratio`` of the channels of every expansion conv (and all dependent channels), in place."""
    import torch_pruning as tp  # noqa: PLC0415  (lazy: optional/heavy dependency)

    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio must be above 0 and below 1 (fraction of expanded channels removed), got {ratio}")
    targets = expansion_convs(model)
    if not targets:
        raise UserError("this model has no 1x1 -> depthwise convolution pairs to prune")
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    was_training = model.training
    model.eval()
    example = torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.0,
        pruning_ratio_dict={t: ratio for t in targets}, ignored_layers=head, round_to=round_to)
    pruner.step()
    model.train(was_training)
    return model


# ------------------------------------------------------------------------------------------- fine-tune
@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, items: list[tuple[str, int]], preprocess: dict[str, Any],
                          images: int = 512, batch_size: int = 64, skipped: Optional["SkippedFiles"] = None) -> int:
    """Re-estimate BatchNorm running statistics on real training images (forward passes only).

    Pruning changes what each projection conv sums, so the BatchNorm after it holds stale statistics;
    re-estimating them recovers much of the accuracy before any gradient step. Unreadable images are left out
    (named and counted by ``skipped``). Returns images used.
    """

    skipped = SkippedFiles() if skipped is None else skipped

    chosen = evenly_spaced(items, images)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    used = 0
    for i in range(0, len(chosen), batch_size):
        read = read_images([p for p, _ in chosen[i:i + batch_size]], preprocess)
        skipped.add(read.failed)
        if len(read.x):  # a batch of unreadable files only: nothing to run
            model(read.x.to(device))
            used += len(read.x)
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.train(was_training)
    return used


def fine_tune(model: nn.Module, data_dir: str, cfg: "TrainConfig", preprocess: dict[str, Any], steps: int, lr: float,
              batch_size: int, device: torch.device, workers: int = 2,
              skipped: Optional["SkippedFiles"] = None, progress: bool = True) -> dict[str, Any]:
    """Recover the accuracy pruning removed: ``steps`` optimizer steps with train.py's own data pipeline and
    step, the checkpoint's preprocessing, augmentation and optimizer, with a cosine decay from ``lr`` to 0.
    The unreadable files its data pipeline skipped (and named) are added to ``skipped``.
    """

    data = load_data(data_dir, img_size=int(preprocess["img_size"]), resize_size=int(preprocess["resize_size"]),
                     mean=preprocess["mean"], std=preprocess["std"], batch_size=batch_size, workers=workers, augment=augment_settings(cfg), cache=cfg.cache,
                     seed=cfg.seed, resize_mode=resize_mode_of(preprocess))
    model.to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optimizer, lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay, no_wd_norm_bias=True)
    ctx = StepContext(Trainable(model), optimizer, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), device,
                      channels_last=True, params=list(model.parameters()))
    schedule, step, epoch, t0, last = WarmupCosine(lr, steps), 0, 0, time.time(), {}
    while step < steps:
        data.set_epoch(epoch)
        torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout: the same fine-tune every run
        done = EpochProgress(step=step)
        last = train_one_epoch(ctx, data.train_loader, schedule, epoch + 1, done, max_steps=steps - step,
                               bar=progress)
        if done.step == step:
            raise UserError(f"{data_dir}/train gave no training batch (every image unreadable?); check it with "
                            "split_dataset.py's report.csv")
        step, epoch = done.step, epoch + 1
    if skipped is not None:
        skipped.merge(data.skipped_paths(), "unreadable (skipped by the fine-tune's data loader)")
    model.to(memory_format=torch.contiguous_format).eval()
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "images_seen": steps * batch_size,
            "last_epoch_train_loss": round(last.get("train_loss", float("nan")), 4),
            "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------ reporting
def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, img_size: int) -> dict[str, Any]:
    """MACs, params and validation top-1 of ``model`` (fp32, CPU)."""

    model = model.cpu().eval()
    return {"macs": count_macs(model, img_size), "params": count_params(model),
            "val_top1": round(top1_percent(batched_logits(model, images), labels), 2)}


def latencies(models: dict[str, nn.Module], img_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Batch-1 latency (ms, median) of each model in eager PyTorch and in onnxruntime fp32, interleaved."""

    x = torch.zeros(1, 3, img_size, img_size)
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            m = m.cpu().eval()
            path = os.path.join(tmp, f"{name}.onnx")
            export_onnx(m, path, img_size, [], {})
            sess = onnx_session(path)
            xn = x.numpy()
            fns[f"{name}/eager"] = lambda m=m: m(x)
            fns[f"{name}/onnxruntime"] = lambda s=sess: s.run(None, {INPUT_NAME: xn})
        with torch.inference_mode():
            # blocks after a pause: one runtime's still-spinning threads must not slow the next (see utils.timing)
            t = interleaved_timings(fns, repeats=repeats, warmup=3, block=5, settle=0.05)
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for key, v in t.items():
        name, kind = key.split("/")
        out[name][f"{kind}_ms"] = round(1000 * median(v), 2)
    return out


def format_report(r: dict[str, Any]) -> str:
    """Markdown table of the before/after numbers."""
    bn = dict(r["after_prune"], val_top1=r["after_prune"]["val_top1_bn_recalibrated"])
    rows = [("original", r["before"]), ("pruned", r["after_prune"]), ("pruned + BatchNorm re-estimated", bn)]
    if r["fine_tune"]:
        rows.append((f"pruned + fine-tune ({r['fine_tune']['steps']} steps)",
                     dict(r["after_fine_tune"], val_top1=r["fine_tune"]["val_top1"])))
    rows.append(("saved pruned.pt", r["after_fine_tune"]))
    lines = ["| model | MMACs | params (M) | val top-1 % | eager b1 ms | onnxruntime b1 ms |", "|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['macs'] / 1e6:.1f} | {m['params'] / 1e6:.3f} | {m['val_top1']:.2f} | "
                     f"{m.get('eager_ms', '')} | {m.get('onnxruntime_ms', '')} |")
    return "\n".join(lines)


def prune_checkpoint(checkpoint: str, *, ratio: float = 0.4, steps: int = 300, lr: float | None = None,
                     batch_size: int | None = None, data: str | None = None, bn_images: int = 512,
                     val_limit: int = 2000, repeats: int = 30, workers: int = 2,
                     out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Prune ``checkpoint`` (see the module docstring), write OUT/pruned.pt and OUT/prune.json, print the
    before/after table; returns the report. OUT defaults to the checkpoint's folder + /pruned."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("pruned"):
        raise UserError(f"{checkpoint} is already pruned; prune the original checkpoint with a larger --ratio")
    data = data or (ckpt.get("config") or {}).get("data")
    if not data:
        raise UserError(f"{checkpoint} does not say where its data is; pass --data DIR (with train/ and val/)")
    classes, preprocess = list(ckpt["classes"]), dict(ckpt["preprocess"])
    cfg = from_checkpoint(ckpt.get("config"), checkpoint)
    img_size = int(preprocess["img_size"])
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "pruned")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    val = evenly_spaced(list_labelled_images(os.path.join(data, "val"), classes), val_limit)
    skipped = SkippedFiles()  # unreadable images of every pass below: named once each, counted in prune.json
    read = read_images([p for p, _ in val], preprocess)
    skipped.add(read.failed)
    if not read.kept:
        raise UserError(f"none of the {len(val)} validation images in {os.path.join(data, 'val')} could be read")
    images, labels = read.x, torch.tensor([val[k][1] for k in read.kept])

    original = model_from_checkpoint(ckpt)
    pruned = model_from_checkpoint(ckpt)
    prune_expanded_channels(pruned, ratio, img_size)
    before = measure(original, images, labels, img_size)
    after_prune = measure(pruned, images, labels, img_size)
    train_items = list_labelled_images(os.path.join(data, "train"), classes)
    after_prune["bn_images"] = recalibrate_batchnorm(pruned, train_items, preprocess, bn_images,
                                                     skipped=skipped)
    after_prune["val_top1_bn_recalibrated"] = measure(pruned, images, labels, img_size)["val_top1"]
    tune = None
    if steps > 0:
        kept = copy.deepcopy(pruned.state_dict())
        lr = lr if lr is not None else cfg.lr / 10
        tune = fine_tune(pruned, data, cfg, preprocess, steps, lr, batch_size or cfg.batch_size, device,
                         workers, skipped=skipped, progress=progress)
        pruned.cpu()
        tune["val_top1"] = measure(pruned, images, labels, img_size)["val_top1"]
        if tune["val_top1"] < after_prune["val_top1_bn_recalibrated"]:
            # A fine-tune that hurts (learning rate too high for this model) must not replace better weights.
            pruned.load_state_dict(kept)
            tune["kept"] = "BatchNorm re-estimated weights (the fine-tune lowered val top-1; try a smaller --lr)"
            print(f"fine-tune lowered val top-1 to {tune['val_top1']:.2f}%; keeping the weights from before it "
                  "(try a smaller --lr or more --steps)")
        else:
            tune["kept"] = "fine-tuned weights"
    after = measure(pruned, images, labels, img_size)
    lat = latencies({"original": original, "pruned": pruned}, img_size, repeats)
    before.update(lat["original"])
    after.update(lat["pruned"])

    state = pruned_state(ckpt, pruned, after["val_top1"], checkpoint, ratio, steps)
    report = {"checkpoint": os.path.abspath(checkpoint), "ratio": ratio, "val_images": len(labels),
              "skipped_images": len(skipped), "skipped_files": skipped.records(),
              "before": before, "after_prune": after_prune, "after_fine_tune": after, "fine_tune": tune,
              "uptime": "load average " + load_average()}
    os.makedirs(out, exist_ok=True)
    save_checkpoint(os.path.join(out, "pruned.pt"), state)
    write_json(os.path.join(out, "prune.json"), report)
    print(format_report(report))
    if len(skipped):
        print(f"skipped {len(skipped)} unreadable image(s) (listed in prune.json)")
    print(f"wrote {out}/pruned.pt and {out}/prune.json; export it with: python export.py {out}/pruned.pt")
    return report
