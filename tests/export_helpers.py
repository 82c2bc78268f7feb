"""A tiny real training run for the export/prune/benchmark tests.

Fashion-MNIST sample (tests/assets/fashion_mnist_sample, 20 real images per class) split 12 train / 8 val
per class, and an ImageNet-pretrained MobileNetV2 at 32 px (6 M MACs, cheap) whose new 10-class head is fitted on
the real train images, so its predictions are real (distinct logits, accuracy well above chance, coherent
BatchNorm statistics for fine-tuning), saved in the COMMON.md checkpoint format.
"""
from __future__ import annotations

import os
import shutil

import torch
from PIL import Image

from models import build_model, load_pretrained
from utils.checkpoint import save_checkpoint
from utils.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
PHOTOS = os.path.join(ROOT, "tests", "assets", "photos")
PREPROCESS = {"img_size": 32, "resize_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def make_split(root: str, n_train: int = 12) -> tuple[str, list[str]]:
    """Copy the sample into ``root/{train,val}/<class>/``; returns (data folder, class names)."""
    classes = sorted(d for d in os.listdir(SAMPLE) if os.path.isdir(os.path.join(SAMPLE, d)))
    for c in classes:
        files = sorted(os.listdir(os.path.join(SAMPLE, c)))
        for split, chosen in (("train", files[:n_train]), ("val", files[n_train:])):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for f in chosen:
                shutil.copy(os.path.join(SAMPLE, c, f), os.path.join(root, split, c, f))
    return root, classes


def make_run(root: str, steps: int = 200, seed: int = 0) -> str:
    """Data split + a briefly trained tiny checkpoint at ``root/run/best.pt``; returns that path."""
    data, classes = make_split(os.path.join(root, "data"))
    torch.manual_seed(seed)
    model = build_model("mobilenet_v2", num_classes=len(classes), dropout=0.0)
    load_pretrained(model, "imagenet")  # real features: BatchNorm statistics and logits of a trained network
    tf = build_eval_transform(PREPROCESS)
    items = [(os.path.join(data, "train", c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(data, "train", c)))]
    x = torch.stack([tf(Image.open(p)) for p, _ in items])
    y = torch.tensor([label for _, label in items])
    # Fit only the classifier on the frozen pretrained features: seconds instead of minutes on 2 shared cores.
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
    head = model.classifier[-1]
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = os.path.join(root, "run", "best.pt")
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": None, "scheduler": None, "scaler": None, "ema": None,
        "epoch": 1, "step": steps, "best_acc": 0.0, "config": {"data": data}, "classes": classes,
        "preprocess": dict(PREPROCESS), "arch": dict(model.arch), "rng": {},
        "versions": {"torch": str(torch.__version__)},
    })
    return path
