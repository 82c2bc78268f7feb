"""Training step speed: train.py's real step with its automatic choices vs every manual variant.

Variants, all on the same real images and loader, timed interleaved (A B C A B C ...) and reported as medians:
  plain fp32 NCHW      - model(x); loss.backward(); optimizer.step() with default memory format and precision
  fp32 channels_last   - utils.train_loop.train_step with NHWC tensors
  bf16 + channels_last - the same under bf16 autocast (on CUDA: bf16 on sm_80+, else fp16 + GradScaler)
  compile              - torch.compile of the fp32 channels_last model (--no-compile to skip: it compiles ~1 min)
  train.py auto        - train_step with what utils.machine decides for this machine and the recipe's run length
                         (probe included: compile is probed only for runs long enough to repay compiling)
Each timed call = fetch the next batch from the loader + one optimizer step. The machine (CPU model and
features, or GPU and compute capability) is printed above the table and saved in the CSV.

    python benchmark.py train                                   # default recipe: Fashion-MNIST, 48 px, batch 256
    python benchmark.py train --img-size 224 --batch-size 32    # photo-sized inputs
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from models import build_model
from utils import config as cfglib
from utils import machine
from utils.data import load_data
from utils.files import csv_text, write_text
from utils.schedule import build_optimizer
from utils.timing import interleaved_timings, median
from utils.train_loop import StepContext, Trainable, speed_plan, train_step, training_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `benchmark.py train`."""
    parser.add_argument("--config", default=None, help="recipe whose model/data settings are used "
                        "(default: configs/default.yaml)")
    parser.add_argument("--data", default=None, help="folder with train/ (default: the recipe's data folder; the "
                        "default Fashion-MNIST split is prepared if missing)")
    parser.add_argument("--model", default=None, help="model name (default: the recipe's)")
    parser.add_argument("--width-mult", type=float, default=None, help="width multiplier (default: the recipe's)")
    parser.add_argument("--img-size", type=int, default=None, help="image size in px (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the recipe's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default: 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--block", type=int, default=2,
                        help="timed steps in a row per variant, after one untimed step (default 2): the first step "
                             "after another variant pays for its memory and kernel caches (measured: fp32 steps 1.3x "
                             "slower right after emulated bf16 ones); 1 = strict A B C A B C")
    parser.add_argument("--out", default="runs/bench/train.csv", help="CSV output (default: %(default)s)")


def run(args: argparse.Namespace, resolve_data_dir: Callable[[cfglib.TrainConfig, bool], str]) -> None:
    """Build the recipe's data and model, time the variants interleaved, print Markdown, save CSV.
    ``resolve_data_dir(cfg, is_main)`` finds (or prepares) the recipe's data folder, as train.py does."""

    flags = {k: v for k, v in {"data": args.data, "model": args.model, "width_mult": args.width_mult,
                               "img_size": args.img_size, "batch_size": args.batch_size}.items() if v is not None}
    path = args.config or cfglib.DEFAULT_RECIPE
    cfg = cfglib.build_config(cfglib.read_yaml(path), path, flags, [])
    device = training_device(args.device)
    cpu = machine.cpu_info()
    threads = machine.decide_threads(cpu, 1)
    machine.apply_threads(threads)
    workers = machine.decide_workers(cfg.workers, device, cpu)
    data_dir = resolve_data_dir(cfg, True)
    data = load_data(data_dir, img_size=cfg.img_size, resize_size=cfg.resize_size, mean=cfg.mean, std=cfg.std,
                     batch_size=cfg.batch_size, workers=workers.value, augment=cfglib.augment_settings(cfg),
                     cache=cfg.cache, seed=0, pin_memory=device.type == "cuda", progress=False)
    data.set_epoch(0)
    torch.manual_seed(0)
    base = build_model(cfg.model, num_classes=len(data.classes), width_mult=cfg.width_mult, dropout=cfg.dropout,
                       small_input=cfg.small_input).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gpu = machine.gpu_info(device)
    low = machine.cuda_amp("auto", gpu).value if gpu else torch.bfloat16
    # Every variant times the whole network: plan as train.py plans its whole-network epochs (a fine-tune recipe's
    # classifier epochs on cached features would plan fp32 NCHW, "set by the user").
    whole = replace(cfg, cache_features=False, freeze="none")
    epochs = cfg.epochs - (cfg.head_epochs if cfg.freeze == "none" else 0)
    run_steps = epochs * min(len(data.train_loader), cfg.max_steps_per_epoch or len(data.train_loader))
    plan = speed_plan(whole, base, device, data.cache, threads, workers, len(data.classes), None, run_steps)
    auto = (bool(plan.channels_last.value), plan.amp_dtype, bool(plan.compile.value))
    auto_desc = machine.variant_name(auto if auto[2] else auto[:2])
    auto_name = f"train.py auto ({auto_desc})"
    variants = {  # name -> (channels_last, autocast dtype, compile)
        "plain fp32 NCHW": (False, None, False),
        "fp32 channels_last": (True, None, False),
        f"{machine.amp_name(low)} + channels_last": (True, low, False),
        auto_name: auto,
    }
    if not args.no_compile:
        variants["compile (fp32 channels_last)"] = (True, None, True)

    def batches():
        while True:
            yield from data.train_loader

    fns = {}
    for name, (cl, dtype, compiled) in variants.items():
        model = copy.deepcopy(base)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        net = torch.compile(model) if compiled else model
        opt = build_optimizer(model, cfg.optimizer, cfg.lr * 0.01, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay, no_wd_norm_bias=cfg.no_wd_norm_bias)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        it = batches()
        if name.startswith("plain"):
            def step(model=model, opt=opt, it=it):
                x, y = next(it)
                x, y = x.to(device), y.to(device)
                loss = criterion(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
        else:
            trainable = Trainable(model, net, compiled_batch=cfg.batch_size if compiled else 0)
            ctx = StepContext(trainable, opt, criterion, device, dtype, scaler, channels_last=cl)

            def step(ctx=ctx, it=it):
                train_step(ctx, *next(it))
                if device.type == "cuda":
                    torch.cuda.synchronize()
        fns[name] = step

    print(f"benchmark.py train: {cfg.model} x{cfg.width_mult} at {cfg.img_size} px, batch {cfg.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats, data: {data_dir} ({data.cache})\n"
          f"machine: {plan.machine}\ntrain.py's automatic choice for a {epochs}-epoch run: {auto_desc} "
          f"(amp: {plan.amp.reason}; channels_last: {plan.channels_last.reason}; compile: {plan.compile.reason})")
    # Emulated bf16 (no oneDNN bf16 kernels) takes 5-10x a normal step and leaves the process slower for a while
    # (measured: the variant timed right after it 1.16-1.43x slower than the same computation elsewhere in the
    # cycle), so it is timed on its own after the interleaved ones instead of disturbing them.
    apart = [n for n, (_, dtype, _) in variants.items() if device.type == "cpu" and dtype == torch.bfloat16
             and not cpu.onednn_bf16]
    times = interleaved_timings({n: f for n, f in fns.items() if n not in apart}, repeats=args.repeats,
                                warmup=args.warmup, block=args.block)
    for name in apart:
        times.update(interleaved_timings({name: fns[name]}, repeats=args.repeats, warmup=args.warmup, block=1))
        print(f"note: {name} is emulated on this CPU and was timed after the others, not interleaved")
    base_med = median(times["plain fp32 NCHW"])
    rows = []
    for name, ts in times.items():
        med = median(ts)
        rows.append({"variant": name, "median_s_per_step": round(med, 4), "images_per_s": round(cfg.batch_size / med, 1),
                     "speedup_vs_plain": round(base_med / med, 2), "img_size": cfg.img_size,
                     "batch_size": cfg.batch_size, "device": str(device), "machine": plan.machine})
    best = min(median(ts) for ts in times.values())
    print(f"\nmachine: {plan.machine}\n| variant | median s/step | img/s | vs plain fp32 NCHW | vs fastest |"
          "\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_s_per_step']:.3f} | {r['images_per_s']:.0f} | {r['speedup_vs_plain']:.2f}x "
              f"| {best / r['median_s_per_step']:.2f} |")
    write_text(args.out, csv_text(list(rows[0]), rows, lineterminator="\n"))
    print(f"\nsaved {args.out}")
