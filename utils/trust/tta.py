"""Test-time augmentation: average the logits of each image and its mirror image (horizontal flip)."""
from __future__ import annotations

import copy

import torch

from utils.deploy.runtime import LoadedModel


def with_flip_tta(model: LoadedModel) -> LoadedModel:
    """A shallow copy of ``model`` whose ``predict_batch`` returns the mean logits of the batch and its flipped
    copy (one forward pass of twice the batch). The original model is left as it is."""
    tta = copy.copy(model)
    plain = model.predict_batch

    def predict_batch(x: torch.Tensor) -> torch.Tensor:
        out = plain(torch.cat([x, x.flip(3)]))
        return (out[: len(x)] + out[len(x):]) / 2

    tta.predict_batch = predict_batch  # type: ignore[method-assign]
    return tta
