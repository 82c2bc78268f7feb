"""Batched inference over image files: find the files, decode them in DataLoader workers, skip the unreadable.

Shared by evaluate.py and predict.py (and usable from benchmarks): ``run_on_files(model, paths)`` returns
the logits of every readable image, the files that failed with their reasons, and images/s.
"""
from __future__ import annotations

import argparse
import glob
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.data import ImageFiles, build_eval_transform, collate_readable, images_under, is_image_file, unreadable_line
from utils.deploy.runtime import LoadedModel
from utils.errors import UserError


def default_workers() -> int:
    """DataLoader worker processes: up to 4, never more than the machine's cores."""
    return min(4, os.cpu_count() or 1)


def expand_image_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Turn files, folders (searched recursively) and glob patterns into image paths.

    Returns ``(paths, unmatched)``: ``unmatched`` lists arguments that named nothing (reported, not fatal).
    An explicitly named file is kept whatever its extension, so a broken file is reported, not ignored.
    """
    paths: list[str] = []
    unmatched: list[str] = []
    for item in items:
        if os.path.isfile(item):
            found = [item]
        elif os.path.isdir(item):
            found = images_under(item)
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and is_image_file(p))
        if not found:
            unmatched.append(item)
        paths += found
    seen: set[str] = set()
    unique = [p for p in paths if not (p in seen or seen.add(p))]
    return unique, unmatched


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags evaluate.py and predict.py share: how images are batched, decoded and run."""
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"DataLoader worker processes decoding images (default: {default_workers()}, "
                        "min(4, CPU cores); 0 decodes in the main process)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the model runtime (default: the runtime's own choice, about one per "
                        "core; on a machine busy with other jobs 1 can be faster)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch has it, else cpu; a TensorRT engine always "
                        "runs on a GPU, cuda:0 by default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def torch_threads_beside_workers(model: LoadedModel, workers: int) -> int | None:
    """Intra-op threads for a PyTorch-run model while ``workers`` decode processes share the machine.

    PyTorch's OpenMP threads busy-wait; with decode workers on the same cores they fight them (measured on
    2 cores, 2 workers: 2 threads gave 120 images/s, 1 thread 753). So the cores are split: workers decode,
    the rest run the model. None = leave as is (ONNX sessions do not spin, an explicit --threads wins).
    """
    if model.kind == "onnx" or model.threads or workers == 0 or model.device.type != "cpu":
        return None
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - workers))


@dataclass
class InferenceResult:
    """Logits of the readable images (rows follow ``indices`` into the input paths) plus what failed."""

    logits: torch.Tensor
    indices: torch.Tensor
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole loop (decode + model)
    model_seconds: float = 0.0  # time inside predict_batch only

    @property
    def images_per_s(self) -> float:
        return len(self.indices) / self.seconds if self.seconds > 0 else 0.0

    @property
    def model_images_per_s(self) -> float:
        return len(self.indices) / self.model_seconds if self.model_seconds > 0 else 0.0


def run_on_files(model: LoadedModel, paths: Sequence[str], batch_size: int = 64, workers: int | None = None,
                 desc: str = "infer", progress: bool = True) -> InferenceResult:
    """Run ``model`` over image files in batches with the model file's own preprocessing.

    Decoding happens in ``workers`` DataLoader processes; unreadable files are collected in ``failed``.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")
    n_batches = -(-len(paths) // batch_size)
    # One batch gains nothing from worker processes, only their start-up time.
    workers = 0 if n_batches <= 1 else min(workers, n_batches)
    loader = DataLoader(ImageFiles(paths, build_eval_transform(model.preprocess)), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=collate_readable,
                        # a TensorRT engine runs on cuda even with a CPU-only torch, which cannot pin memory
                        pin_memory=model.device.type == "cuda" and torch.cuda.is_available())
    logits: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    failed: list[tuple[str, str]] = []
    model_seconds = 0.0
    model.expect_images(len(paths))  # a checkpoint decides whether exporting to onnxruntime pays off
    threads_before = torch.get_num_threads()
    threads = torch_threads_beside_workers(model, workers)
    t0 = time.perf_counter()
    try:
        if threads:
            torch.set_num_threads(threads)
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for x, idx, bad in loader:
                failed += [(paths[i], err) for i, err in bad]
                if x is not None:
                    t1 = time.perf_counter()
                    logits.append(model.predict_batch(x))
                    model_seconds += time.perf_counter() - t1
                    indices.append(idx)
                bar.update(len(idx) + len(bad))
    finally:
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t0
    out = torch.cat(logits) if logits else torch.empty(0, model.num_classes)
    ids = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)
    return InferenceResult(out, ids, failed, seconds, model_seconds)


def summarize_failures(failed: list[tuple[str, str]], limit: int = 5) -> list[str]:
    """Human lines for unreadable files (first ``limit`` shown, then a count); the tools themselves name every
    file (utils.data.SkippedFiles)."""
    lines = [unreadable_line(p, err) for p, err in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"... and {len(failed) - limit} more unreadable images")
    return lines


def as_records(failed: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Failures as JSON-friendly dicts."""
    return [{"file": p, "error": e} for p, e in failed]
