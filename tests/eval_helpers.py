"""Tiny real model files for the evaluate/predict/runtime tests (checkpoint, TorchScript, ONNX).

The checkpoint follows COMMON.md's format; the exports embed classes/preprocess exactly as export.py
does (TorchScript ``_extra_files``, ONNX ``metadata_props``), so the tests need no other helper's script.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch
from PIL import Image

from models import build_model
from utils.checkpoint import save_checkpoint
from utils.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "tests", "assets", "photos")
PREPROCESS = {"img_size": 32, "resize_size": 36, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


@contextlib.contextmanager
def one_thread():
    """Run tiny models on one intra-op thread, then restore the setting.

    These 32 px models gain nothing from more threads, and on a machine shared with other jobs several
    spinning OpenMP threads made them 10-50x slower (measured); tests must stay fast everywhere.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def photo_paths() -> list[str]:
    """The 12 committed real photos, sorted."""
    return sorted(os.path.join(PHOTOS, f) for f in os.listdir(PHOTOS) if f.endswith(".jpg"))


def link_sample_split(root: str, n_train: "int | dict[str, int]", n_val: int, classes: list[str] | None = None) -> str:
    """``root/{train,val}/<class>/`` of symlinks to the committed real Fashion-MNIST sample PNGs
    (first ``n_train`` / next ``n_val`` of each class, sorted names; ``n_train`` may be a count per class, whose
    keys are then the classes); returns ``root``."""
    sample = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
    counts = n_train if isinstance(n_train, dict) else {c: n_train for c in classes or sorted(os.listdir(sample))}
    for c, n in counts.items():
        files = sorted(os.listdir(os.path.join(sample, c)))
        for part, chosen in (("train", files[:n]), ("val", files[n:n + n_val])):
            os.makedirs(os.path.join(root, part, c), exist_ok=True)
            for f in chosen:
                os.symlink(os.path.join(sample, c, f), os.path.join(root, part, c, f))
    return str(root)


def make_class_folders(root: str, groups: dict[str, list[str]]) -> str:
    """Copy real photos into ``root/<class>/<file>`` (an ImageFolder split); returns ``root``."""
    for cls, files in groups.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for f in files:
            shutil.copy(f, os.path.join(root, cls, os.path.basename(f)))
    return root


@one_thread()
def make_checkpoint(path: str, classes: list[str], train_images: list[tuple[str, int]] | None = None,
                    steps: int = 25, config: dict | None = None, seed: int = 0) -> str:
    """Save a width-0.25 MobileNetV2 (32 px) checkpoint; optionally fit it briefly on real images
    so its predictions differ per image (parity tests need clear, non-tied logits)."""
    torch.manual_seed(seed)
    model = build_model("mobilenet_v2", num_classes=len(classes), width_mult=0.25, dropout=0.0)
    if train_images:
        tf = build_eval_transform(PREPROCESS)
        x = torch.stack([tf(Image.open(p)) for p, _ in train_images])
        y = torch.tensor([c for _, c in train_images])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        # Re-estimate BatchNorm statistics on the same images so eval mode matches what was fitted.
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            model(x)
    model.eval()
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": None, "scheduler": None, "scaler": None, "ema": None,
        "epoch": 1, "step": steps, "best_acc": 0.0, "config": dict(config or {}), "classes": list(classes),
        "preprocess": dict(PREPROCESS), "arch": dict(model.arch), "rng": {},
        "versions": {"torch": str(torch.__version__), "torchvision": ""},
    })
    return path


def _model_of(ckpt_path: str) -> tuple[torch.nn.Module, dict]:
    from utils.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    return model_from_checkpoint(ckpt), ckpt


@one_thread()
def export_torchscript(ckpt_path: str, out: str) -> str:
    """Trace the checkpoint's model and embed classes/preprocess as JSON ``_extra_files``."""
    model, ckpt = _model_of(ckpt_path)
    size = ckpt["preprocess"]["img_size"]
    ts = torch.jit.trace(model, torch.randn(2, 3, size, size))
    torch.jit.save(ts, out, _extra_files={"classes": json.dumps(ckpt["classes"]),
                                          "preprocess": json.dumps(ckpt["preprocess"])})
    return out


@one_thread()
def export_onnx(ckpt_path: str, out: str) -> str:
    """Export to ONNX (opset 17, input "input", output "logits", dynamic batch) with metadata_props."""
    import onnx

    model, ckpt = _model_of(ckpt_path)
    size = ckpt["preprocess"]["img_size"]
    torch.onnx.export(model, (torch.randn(2, 3, size, size),), out, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(out)
    for key in ("classes", "preprocess"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(ckpt[key])
    onnx.save(proto, out)
    return out


def fitted_sample_run(root: str, n_train: int, n_val: int, steps: int) -> tuple[str, str]:
    """A sample split under ``root/data`` and a checkpoint fitted on its train images (``root/run/best.pt``,
    its config pointing at the split); returns (data folder, checkpoint path)."""
    data = link_sample_split(os.path.join(root, "data"), n_train=n_train, n_val=n_val)
    classes = sorted(os.listdir(os.path.join(data, "train")))
    train = [(os.path.join(data, "train", c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(data, "train", c)))]
    return data, make_checkpoint(os.path.join(root, "run", "best.pt"), classes, train, steps=steps,
                                 config={"data": data})
