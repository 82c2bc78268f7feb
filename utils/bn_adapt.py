"""BatchNorm statistics re-estimated on the user's training images before fine-tuning (AdaBN).

Why: ImageNet's BatchNorm running statistics do not describe a folder of greyscale inspection photos or
28 px clothes. A classifier trained on the frozen backbone's features (eval mode: ImageNet statistics) then
meets different features the moment the whole network trains (train mode: the batch's own statistics, and
running statistics that drift to the folder's within one epoch). Measured on an imbalanced Fashion-MNIST folder
(docs/finetune.md): val balanced accuracy fell from 72-77% to 38-54% after the first whole-network epoch, at
any learning rate. Re-estimating the statistics once, before the features are cached, makes both phases see the
same normalisation (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation").
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist
from torch import nn
from tqdm import tqdm

from utils.data import ImageFiles, build_eval_transform, collate_readable, load_image_folder
from utils.deploy.export import evenly_spaced

MAX_IMAGES = 2048  # statistics of 2,048 images are as good as of all of them, and cost ~20 s on 2 CPU cores


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, data_dir: str, preprocess: dict, batch_size: int, workers: int,
                    device: torch.device, rank: int = 0, world_size: int = 1, max_images: int = MAX_IMAGES,
                    bar: bool = False) -> dict:
    """Replace every BatchNorm layer's running mean/variance by the average over ``data_dir/train`` images
    (eval transform, evenly spaced up to ``max_images``; each torchrun process a share, then averaged weighted by
    the images each process read).

    Unreadable files are left out silently here (the feature pass or the loader that reads them next names
    them). Returns ``{"images": n, "layers": k}`` for the run's record.
    """
    layers = _bn_layers(model)
    if not layers:
        return {"images": 0, "layers": 0}
    samples = load_image_folder(os.path.join(data_dir, "train")).samples
    picked = [path for path, _ in evenly_spaced(samples, max_images)]  # every class represented
    mine = picked[rank::world_size]
    loader = torch.utils.data.DataLoader(ImageFiles(mine, build_eval_transform(preprocess)), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate_readable)
    saved = [(m.momentum, m.training, m.running_mean.clone(), m.running_var.clone()) for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    seen, pending = 0, []  # readable images wait for a full batch (unreadable files leave gaps)
    try:
        for x, _, _ in tqdm(loader, desc="BatchNorm statistics", disable=not bar, leave=False):
            pending += [] if x is None else list(x)
            while len(pending) >= batch_size:
                model.features(torch.stack(pending[:batch_size]).to(device))
                seen, pending = seen + batch_size, pending[batch_size:]
        if len(pending) > 1:  # one image has no batch statistics (a 1x1 last layer)
            model.features(torch.stack(pending).to(device))
            seen += len(pending)
    finally:
        for m, (momentum, training, mean, var) in zip(layers, saved):
            m.momentum = momentum
            m.train(training)
            if not seen:  # nothing was readable (or the pass failed): keep the pretrained statistics
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        model.train(was_training)
    if world_size > 1:
        # each process's statistics weighted by the images it saw: a process whose share was empty or unreadable
        # (it kept the pretrained statistics) adds nothing, and unequal shares count as one pass over all images
        total = torch.tensor(float(seen), device=layers[0].running_mean.device)
        tdist.all_reduce(total)
        for m in layers:
            for t in (m.running_mean, m.running_var):
                mixed = t * seen
                tdist.all_reduce(mixed)
                if total > 0:  # no process saw an image: every one kept the pretrained statistics
                    t.copy_(mixed / total)
        seen = int(total)
    return {"images": seen, "layers": len(layers)}
