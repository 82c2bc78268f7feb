"""Remedies for imbalanced training folders (``class_balance``); whether a folder is imbalanced and which remedy
``auto`` picks: utils/imbalance.py.

- ``loss`` = :class:`WeightedCrossEntropy` with :func:`class_weights` (inverse class frequency, mean 1);
- ``sampler`` = every epoch draws ``len(train)`` images with replacement, each with weight 1 / (its class count),
  so classes come out evenly (:func:`sample_weights` + :func:`epoch_order`, used by utils.data.EpochBatchSampler
  and utils.train_loop.FeatureBatches); ``sqrt`` = the same draw with weight 1 / sqrt(its class count), so class
  totals follow the square root of the counts;
- ``logit_adjust``: :class:`LogitAdjusted` over the share of each class in an epoch's draw (:func:`draw_prior`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def class_counts(labels: torch.Tensor | Sequence[int], num_classes: int) -> list[int]:
    """Number of images of each class ``0 .. num_classes-1``."""
    return torch.bincount(torch.as_tensor(labels, dtype=torch.int64), minlength=num_classes).tolist()


# --------------------------------------------------------------------------------------------- remedies
def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Loss weight of each class: 1 / count, scaled so the classes that have images average 1 (empty classes: 0,
    they never are a target)."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    w = torch.where(c > 0, 1.0 / c.clamp(min=1), torch.zeros_like(c))
    return (w / w[c > 0].mean()).float()


def sample_weights(labels: torch.Tensor | Sequence[int], num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Draw weight of each image: 1 / (number of images of its class) ** power. ``power`` 1: each class gets the
    same total (``sampler``); 0.5: class totals in proportion to the square root of their counts (``sqrt``)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=num_classes).double()
    return (1.0 / counts.pow(power))[labels]


def epoch_order(n: int, generator: torch.Generator, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One epoch's ``n`` image indices: a permutation, or with ``weights`` ``n`` draws with replacement in
    proportion to them (the balanced sampler). A pure function of the generator's seed."""
    if weights is None:
        return torch.randperm(n, generator=generator)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} sample weights for {n} images")
    return torch.multinomial(weights.double(), n, replacement=True, generator=generator)


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy with label smoothing, for index or soft (MixUp/CutMix) targets.

    Each sample's smoothed cross-entropy ``-sum_c q_c log p_c`` (``q`` = (1 - eps) * target + eps / C) is weighted
    by its class weight ``w[y]`` (soft targets: ``sum_c target_c * w_c``), and the batch loss is the weighted mean
    ``sum_i w_i CE_i / sum_i w_i``. With eps = 0 this equals ``nn.CrossEntropyLoss(weight=w)``. Unlike
    ``nn.CrossEntropyLoss(weight=w, label_smoothing=eps)``, whose smoothing term weights every class's log-prob by
    that class's weight (so smoothing pulls all samples towards the rare classes), smoothing here is the
    ordinary uniform one and only the sample's own class sets its weight.
    """

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=1)
        w = self.weight.to(logp.device)
        if target.dim() == 1:  # class indices
            q = torch.nn.functional.one_hot(target, logp.shape[1]).to(logp.dtype)
        else:
            q = target.to(logp.dtype)
        sample_w = q @ w
        eps = self.label_smoothing
        q = q * (1.0 - eps) + eps / logp.shape[1]
        ce = -(q * logp).sum(dim=1)
        return (sample_w * ce).sum() / sample_w.sum().clamp(min=1e-12)


def draw_prior(counts: Sequence[int], mode: str) -> torch.Tensor:
    """The share of each class among the images one training epoch draws under ``class_balance`` ``mode``:
    the counts themselves (none), their square roots (sqrt), or even (sampler; loss, whose weights even them)."""
    c = torch.as_tensor(counts, dtype=torch.float64).clamp(min=0)
    # loss weights even the classes; sqrt and sampler draw with their sampler power; "auto" must be resolved first
    power = {"none": 0.0, "loss": 1.0, **SAMPLER_POWER}[mode]
    share = torch.where(c > 0, c.clamp(min=1).pow(1.0 - power), torch.zeros_like(c))
    return (share / share.sum()).float()


class LogitAdjusted(nn.Module):
    """``criterion(logits + tau * log(prior), target)``: the logit-adjusted loss (Menon et al., 2021). The network
    then learns scores whose argmax suits classes of equal weight (balanced accuracy) rather than ``prior``'s
    shares; inference uses the plain logits. Classes with no images get a prior of 0 (log clamped)."""

    def __init__(self, criterion: nn.Module, prior: torch.Tensor, tau: float = 1.0) -> None:
        super().__init__()
        self.criterion = criterion
        self.register_buffer("offset", tau * prior.float().clamp(min=1e-12).log())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits + self.offset.to(logits.device, logits.dtype), target)


def train_labels(loader) -> torch.Tensor:
    """The class index of every training image, by index, as the train loader holds them (memory cache and cached
    features: its ``labels``; disk loader: its dataset's ``samples``)."""
    labels = getattr(loader, "labels", None)
    if labels is not None:
        return torch.as_tensor(labels, dtype=torch.int64)
    inner = getattr(loader, "loader", loader)  # utils.data.SkippingLoader wraps the DataLoader
    return torch.tensor([label for _, label in inner.dataset.samples], dtype=torch.int64)


SAMPLER_POWER = {"sampler": 1.0, "sqrt": 0.5}  # class_balance -> power of sample_weights


def use_balanced_sampler(loader, labels: torch.Tensor, num_classes: int, mode: str = "sampler") -> None:
    """Make ``loader``'s epoch order the class-balanced draw (its batch sampler, or the FeatureBatches itself);
    ``mode`` is ``sampler`` (classes evenly) or ``sqrt`` (classes in proportion to the square root of their counts)."""
    target = getattr(loader, "batch_sampler", loader)
    target.weights = sample_weights(labels, num_classes, SAMPLER_POWER[mode])
