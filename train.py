#!/usr/bin/env python
"""Train a MobileNet classifier on a folder of class sub-folders (DATA/train/<class>/*, DATA/val/<class>/*).

    python train.py                                   # default recipe: Fashion-MNIST from scratch on a CPU (93.0% val top-1, 7 min)
    python train.py --config configs/finetune.yaml --data my_photos_split --out runs/flowers
    python train.py --resume runs/flowers/last.pt     # continue exactly where it stopped
    torchrun --nproc_per_node=2 train.py --config configs/cifar10.yaml --data ...   # DistributedDataParallel

Settings come from a YAML recipe (configs/*.yaml), then the flags below, then `--set key=value` (repeatable,
values parsed as YAML). Outputs go to one run folder: config.yaml, log.csv, curves.png, last.pt, best.pt.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from utils.process import configure_process  # imports nothing that loads torch

if __name__ == "__main__":
    configure_process("train")  # idle OpenMP threads spin briefly, then sleep (utils/process.py); must precede torch

import torch
from torch import nn

from datasets.default import resolve_data_dir
from models import build_model, count_params, load_pretrained
from utils import balance as ballib
from utils import config as cfglib
from utils import imbalance as imblib
from utils import machine
from utils.bn_adapt import adapt_batchnorm
from utils.checkpoint import Preprocess, load_checkpoint, save_checkpoint, training_state
from utils.data import load_data, load_split
from utils.data.folders import scan_class_folders
from utils.data.shape import choose_resize_mode, resize_mode_line
from utils.distributed import (
    barrier,
    broadcast_object,
    cleanup,
    convert_sync_batchnorm,
    init_distributed,
    local_world_size,
)
from utils.errors import UserError, run_main
from utils.log import CSVLogger, plural_s, seconds_text, summary_line
from utils.lr_find import run_lr_find
from utils.plots import plot_curves
from utils.rank_state import (
    StopRequest,
    StopRequested,
    check_resume_world,
    gather_rank_states,
    partial_epoch_entry,
    restore_partial,
)
from utils.schedule import WarmupCosine, build_optimizer
from utils.train_loop import (
    EMA,
    EpochProgress,
    NonFiniteLoss,
    StepContext,
    Trainable,
    build_mixup,
    cache_pooled_features,
    epoch_seed,
    speed_plan,
    train_one_epoch,
    training_device,
    validate,
)
from utils.trust.calibration import calibrate_checkpoint
from utils.trust.reject import DEFAULT_TARGET_ACCURACY


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys for --set (and YAML recipes):\n" + cfglib.describe_keys())
    parser.add_argument("--config", default=None,
                        help="YAML recipe (default: configs/default.yaml; with --resume: the checkpoint's config)")
    for flag, (key, text) in cfglib.FLAGS.items():
        tp = cfglib.field_types()[key]
        parser.add_argument(flag, dest=key, type=tp, default=argparse.SUPPRESS, help=text)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. --set label_smoothing=0.1 --set nesterov=true (repeatable)")
    parser.add_argument("--lr-find", action="store_true",
                        help="instead of training, sweep the learning rate exponentially over --lr-find-range on this "
                             "recipe's real data, model and pipeline, write RUN/lr_find.csv and RUN/lr_find.png and "
                             "print a suggested --lr (smoothed-loss minimum / 10; none when the loss never fell); no checkpoint is written or changed. "
                             "It sweeps the recipe's first phase: with head epochs (finetune.yaml) the classifier on "
                             "cached features (its lr is head_lr); --set head_epochs=0 sweeps the whole network")
    parser.add_argument("--lr-find-steps", type=int, default=100,
                        help="steps of the --lr-find sweep, at most one epoch (default 100); it stops earlier when "
                             "the smoothed loss exceeds 4x its minimum")
    parser.add_argument("--lr-find-range", type=float, nargs=2, default=[1e-6, 1.0], metavar=("START", "END"),
                        help="first and last learning rate of the --lr-find sweep (default 1e-6 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="no progress bars, only the one line per epoch (for logs; same as --set progress=false)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out folder that already holds a run (its last.pt, best.pt and "
                             "log.csv are replaced; sub-folders such as eval/ and export/ are left as they are); "
                             "without it such a folder is refused, so a finished or interrupted run is never lost")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[cfglib.TrainConfig, dict | None]:
    """Recipe (or the resumed run's config) <- flags <- --set. Returns the config and the resume checkpoint."""
    flags = {k: v for k, v in vars(args).items()
             if k not in ("config", "sets", "overwrite") and not k.startswith("lr_find")}
    ckpt = None
    if flags.get("resume"):
        ckpt = load_checkpoint(flags["resume"])
        if args.config is None:
            recipe, source = dict(ckpt.get("config") or {}), f"{flags['resume']} (its config)"
            recipe.pop("resume", None)
            used = ckpt.get("class_balance_used") or {}
            for key in ("class_balance", "select_metric"):
                if recipe.get(key) == "auto" and key in used:  # what auto meant then: a newer default must not
                    recipe[key] = used[key]                    # change the draw of a run half done
                recipe.setdefault(key, {"class_balance": "none", "select_metric": "top1"}[key])  # a run from before these keys
            flags.setdefault("out", os.path.dirname(os.path.abspath(flags["resume"])))
        else:
            recipe, source = cfglib.read_yaml(args.config), args.config
    else:
        path = args.config or cfglib.DEFAULT_RECIPE
        recipe, source = cfglib.read_yaml(path), path
    return cfglib.build_config(recipe, source, flags, args.sets), ckpt


def refuse_to_overwrite(cfg: cfglib.TrainConfig, args: argparse.Namespace) -> None:
    """A fresh run into a folder holding another run's checkpoints or log would replace them: refuse in one line
    that names the ways on, unless ``--overwrite`` (``--resume`` continues the run; ``--lr-find`` writes no run)."""
    if cfg.resume or args.lr_find or args.overwrite:
        return
    found = [f for f in ("last.pt", "best.pt", "log.csv") if os.path.isfile(os.path.join(cfg.out, f))]
    if found == ["log.csv"] and not _has_epoch_rows(os.path.join(cfg.out, "log.csv")):
        found = []  # a run stopped before its first epoch ended (Ctrl-C in the feature pass): nothing to keep
    if found:
        last = os.path.join(cfg.out, "last.pt")
        resume = f"continue it with --resume {last}, " if "last.pt" in found else ""
        raise UserError(f"{cfg.out} already holds a run ({', '.join(found)}); {resume}choose another --out, or pass "
                        "--overwrite to replace it")


def _has_epoch_rows(path: str) -> bool:
    """True when the log.csv at ``path`` holds at least one epoch below its header."""
    with open(path, newline="") as f:
        return sum(1 for line in f if line.strip()) > 1


def make_model(cfg: cfglib.TrainConfig, num_classes: int, resuming: bool, is_main: bool) -> nn.Module:
    """Build the network, load pretrained weights (fresh runs only) and freeze the backbone if asked."""
    torch.manual_seed(cfg.seed)  # same initial weights whatever ran before (data loading, process group setup)
    model = build_model(cfg.model, num_classes=num_classes, width_mult=cfg.width_mult, dropout=cfg.dropout,
                        small_input=cfg.small_input)
    if cfg.pretrained != "none" and not resuming:
        report = load_pretrained(model, cfg.pretrained)
        if is_main:
            print(report)
    if cfg.freeze == "features":
        model.features.requires_grad_(False)
    return model


def resumed_feature_engine(resumed: dict | None) -> str:
    """The engine for the cached feature pass: a run resumed on the same machine recomputes its features with the
    engine it used before (so it continues bit for bit); anything else lets utils/deploy/engine.py decide."""
    speed = (resumed or {}).get("speed") or {}
    used = (speed.get("feature_engine") or {}).get("value")
    same_machine = speed.get("machine") == machine.cpu_info().describe()
    return used if same_machine and used in ("onnxruntime", "pytorch") else "auto"


def class_balance_plan(cfg: cfglib.TrainConfig, labels: torch.Tensor, classes: list[str],
                       val_missing: Sequence[str] = ()) -> dict:
    """The imbalance of the training folder and the class_balance / select_metric actually used, with reasons
    (utils/balance.py), and the classes val/ has no images of; printed in the run header, saved in config.yaml and
    the checkpoints."""
    counts = ballib.class_counts(labels, len(classes))
    balance = imblib.decide_class_balance(cfg.class_balance, counts)
    select = imblib.decide_select_metric(cfg.select_metric, counts)
    return {"train_counts": dict(zip(classes, counts)), "ratio": imblib.imbalance(counts)[2],
            "imbalanced": imblib.is_imbalanced(counts), "described": imblib.describe_counts(counts, classes),
            "class_balance": balance.value, "class_balance_reason": balance.reason,
            "select_metric": select.value, "select_metric_reason": select.reason,
            "val_missing": list(val_missing)}


def val_missing_classes(data_dir: str, classes: list[str]) -> list[str]:
    """The classes of the run with no image files in ``data_dir/val`` (load_split accepts such a val/)."""
    per_class, _ = scan_class_folders(os.path.join(data_dir, "val"))
    return [c for c in classes if c not in per_class]


def val_missing_line(missing: list[str], num_classes: int) -> str:
    """The note for classes with training images but none in val/ (a folder split by hand, or a class too small
    for split_dataset.py to share): nothing measures them, so the user hears it before trusting the scores."""
    them = ", ".join(missing)
    return (f"  val/ has no images of {them}: {'its' if len(missing) == 1 else 'their'} recall is not measured; "
            f"balanced accuracy, macro-F1 and the choice of best.pt use the other {num_classes - len(missing)} "
            f"classes (move some of {'its' if len(missing) == 1 else 'their'} images to val/, or re-split with "
            "split_dataset.py)")


def checkpoint_state(cfg, model, optimizer, schedule, scaler, ema, epoch, step, best_acc, classes,
                     plan: machine.SpeedPlan, partial: EpochProgress | None = None, balance: dict | None = None) -> dict:
    """The checkpoint dict (format in utils/checkpoint.py): everything needed to continue bit for bit."""
    return training_state(model=model, optimizer=optimizer, scheduler=schedule, scaler=scaler, ema=ema, epoch=epoch,
                          step=step, best_acc=best_acc, config=cfglib.to_dict(cfg), classes=classes,
                          preprocess=Preprocess.from_config(cfg), speed=plan.record(), balance=balance,
                          partial_epoch=None if partial is None else partial_epoch_entry(partial))


@dataclass
class Phase:
    """A stretch of epochs with one setup: ``head`` trains the classifier alone (backbone frozen, on cached
    features when ``cache_features``), ``full`` trains the whole network. ``cfg`` holds the phase's settings."""

    name: str
    cfg: cfglib.TrainConfig
    first: int  # first epoch (0-based)
    end: int  # the phase stops before this epoch


def plan_phases(cfg: cfglib.TrainConfig) -> list[Phase]:
    """``freeze: features``: the head alone; ``head_epochs: N`` with ``freeze: none``: the head for N epochs,
    then the whole network re-warmed (fastai's ``fine_tune``); else the whole network from the start."""
    if cfg.freeze == "features":
        return [Phase("head", cfg, 0, cfg.epochs)]
    full = replace(cfg, cache_features=False)  # features can only be cached while the backbone is frozen
    if cfg.head_epochs == 0:
        return [Phase("full", full, 0, cfg.epochs)]
    head = replace(cfg, freeze="features", lr=cfg.head_lr or cfg.lr, warmup_epochs=0.0)
    return [Phase("head", head, 0, cfg.head_epochs), Phase("full", full, cfg.head_epochs, cfg.epochs)]


@dataclass
class Run:
    """What the phases of one run share: where it writes, the clock, the best result and the global step."""

    cfg: cfglib.TrainConfig
    out: str
    data_dir: str
    main_proc: bool
    classes: list
    t0: float  # time.perf_counter() at the run's (virtual) start: a resumed run carries its earlier minutes
    logger: CSVLogger | None = None
    best_acc: float = 0.0  # the best epoch's select_metric so far
    best_se: float = 0.0  # its standard error (select_se: later epochs within select_se of these replace best.pt)
    kept: dict | None = None  # the epoch in best.pt: {"epoch", "value"}
    step: int = 0
    row: dict | None = None
    best_name: str = "val top-1"  # what best_acc measures (select_metric)
    budget_fit: dict | None = None  # what --time-budget decided (kept in the checkpoint)
    bn_adapted: dict | None = None  # what bn_adapt did (a fresh run only), for config.yaml
    resize_decision: dict | None = None  # what resize_mode auto decided (a fresh run only), for config.yaml
    lr_find: dict | None = None  # --lr-find: run_lr_find's settings, then its summary (the first phase is swept)
    unreadable: set = field(default_factory=set)  # images skipped so far (every phase, every process; kept in ckpt)
    val_missing: list = field(default_factory=list)  # classes with no image in val/ (listed once, told every phase)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def setup_device(cfg: cfglib.TrainConfig):
    """The device and the torchrun process group (``dist.enabled`` False in a single process)."""
    device = training_device(cfg.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, dist


def restore_settings(cfg: cfglib.TrainConfig, ckpt: dict | None, world_size: int) -> cfglib.TrainConfig:
    """What a resumed run keeps from its checkpoint: the process count it needs, the epochs --time-budget fitted."""
    if ckpt is not None:
        check_resume_world(ckpt, world_size, cfg.resume)
        if ckpt.get("time_budget_fit"):  # the epochs --time-budget fitted stay fitted
            cfg = replace(cfg, epochs=int(ckpt["time_budget_fit"]["epochs"]))
    return cfg


def find_data(cfg: cfglib.TrainConfig, ckpt: dict | None, is_main: bool) -> tuple[str, list[str], list[str]]:
    """The data folder (the default one prepared on first use), its classes (a resumed run needs the same) and
    its training images' paths."""
    data_dir = resolve_data_dir(cfg, is_main)
    train_ds = load_split(data_dir)[0]
    classes = list(train_ds.classes)
    if ckpt is not None and list(ckpt.get("classes", classes)) != classes:
        raise UserError(f"{cfg.resume} was trained on classes {ckpt['classes']}, but {data_dir} has {classes}; "
                        "resume with the same --data")
    return data_dir, classes, [path for path, _ in train_ds.samples]


def decide_resize_mode(cfg: cfglib.TrainConfig, ckpt: dict | None, train_paths: list[str],
                       is_main: bool) -> tuple[cfglib.TrainConfig, dict | None]:
    """``resize_mode`` auto made concrete from the training images' shape (utils/data/shape.py), one line about
    it; a resumed run keeps its checkpoint's preprocessing. Returns the config and the decision (None: none made)."""
    if ckpt is not None:
        mode = Preprocess.from_dict(ckpt.get("preprocess"), cfg.resume).resize_mode
        return replace(cfg, resize_mode=mode), None
    if cfg.resize_mode != "auto":
        return cfg, None
    decision = choose_resize_mode(train_paths)
    if is_main:
        print(resize_mode_line(decision))
    return replace(cfg, resize_mode=decision["resize_mode"]), decision


def restore_model(cfg: cfglib.TrainConfig, num_classes: int, ckpt: dict | None, device: torch.device,
                  dist, data_dir: str) -> tuple[nn.Module, dict | None]:
    """The network on its device: built (pretrained weights on a fresh run, their BatchNorm statistics
    re-estimated on ``data_dir``'s training images with ``bn_adapt``), synced BatchNorm under torchrun if asked,
    and the checkpoint's weights when resuming. Also returns what bn_adapt did (None: not run)."""
    model = make_model(cfg, num_classes, resuming=ckpt is not None, is_main=dist.is_main)
    bn_adapted = None
    if cfg.bn_adapt and cfg.pretrained != "none" and ckpt is None:  # before SyncBatchNorm: each process its share
        workers = machine.decide_workers(cfg.workers, device, machine.cpu_info(), local_world_size(dist),
                                         feature_pass=True)
        bn_adapted = adapt_batchnorm(model.to(device), data_dir, Preprocess.from_config(cfg).as_dict(),
                                     cfg.batch_size, workers.value, device, dist.rank, dist.world_size,
                                     bar=dist.is_main and cfg.progress)
        if dist.is_main:
            print(f"BatchNorm statistics re-estimated on {bn_adapted['images']} training images "
                  f"({bn_adapted['layers']} layers; bn_adapt, utils/bn_adapt.py)")
    if dist.enabled and cfg.sync_bn:
        model = convert_sync_batchnorm(model, device.type)  # same top module, BN children swapped
    model.to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return model, bn_adapted


def open_run(cfg: cfglib.TrainConfig, args: argparse.Namespace, ckpt: dict | None, data_dir: str,
             classes: list[str], is_main: bool) -> tuple[Run, int]:
    """The run's shared state (clock, best result, global step; carried over when resuming) and its log.csv;
    returns it with the epoch to start from. ``--lr-find`` writes no log: the folder may hold a real run."""
    run = Run(cfg, cfg.out, data_dir, is_main, classes, time.perf_counter() - float((ckpt or {}).get("elapsed_s", 0.0)),
              budget_fit=(ckpt or {}).get("time_budget_fit"), unreadable=set((ckpt or {}).get("unreadable", [])))
    start_epoch = int(ckpt["epoch"]) if ckpt is not None else 0
    if ckpt is not None:
        run.step, run.best_acc = int(ckpt["step"]), float(ckpt["best_acc"])
        run.best_se, run.kept = float(ckpt.get("best_se", 0.0)), ckpt.get("best_kept")  # absent before select_se
        # what best_acc measures: a finished run resumed trains no phase that would set it again
        run.best_name = imblib.SELECT_NAMES.get(ckpt.get("best_metric", "top1"), run.best_name)
    if args.lr_find:
        run.lr_find = {"steps": args.lr_find_steps, "lr_range": tuple(args.lr_find_range)}
    elif is_main:
        os.makedirs(run.out, exist_ok=True)
        run.logger = CSVLogger(os.path.join(run.out, "log.csv"), keep_epochs_upto=start_epoch)
    return run, start_epoch


def print_header(run: Run, model: nn.Module, device: torch.device, dist, phases: list[Phase], start_epoch: int) -> None:
    cfg = run.cfg
    print(f"{cfg.model} x{cfg.width_mult} ({count_params(model) / 1e6:.2f} M params) | {len(run.classes)} classes | "
          f"{device}{f' x{dist.world_size} processes' if dist.enabled else ''} | {cfg.epochs} epoch{plural_s(cfg.epochs)}: "
          + ", then ".join(f"{p.end - p.first} {phase_text(p.name, p.end - p.first)}" for p in phases)
          + (f" | time budget {cfg.time_budget:g} min" if cfg.time_budget else "") + f" | run folder {run.out}")
    if start_epoch:
        print(f"resuming after epoch {start_epoch} (global step {run.step}) from {cfg.resume}")


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    # config: recipe <- flags <- --set, validated once (utils/config.py); the resume checkpoint if any
    cfg, ckpt = resolve_config(args)
    refuse_to_overwrite(cfg, args)
    # device and processes
    device, dist = setup_device(cfg)
    if args.lr_find and dist.enabled:  # before any data or probe work, on every process alike
        raise UserError("--lr-find runs in one process; start it with python, not torchrun")
    barrier()  # every process has checked --out before process 0 writes into it (nccl connects lazily)
    torch.manual_seed(cfg.seed)
    cfg = restore_settings(cfg, ckpt, dist.world_size)
    # data folder and classes
    data_dir, classes, train_paths = find_data(cfg, ckpt, dist.is_main)
    cfg, resize_decision = decide_resize_mode(cfg, ckpt, train_paths, dist.is_main)
    # model, restored when resuming
    model, bn_adapted = restore_model(cfg, len(classes), ckpt, device, dist, data_dir)
    # run folder, phases (each phase builds its data, speed plan, optimizer and schedule, wrapping: run_phase)
    run, start_epoch = open_run(cfg, args, ckpt, data_dir, classes, dist.is_main)
    run.bn_adapted, run.resize_decision = bn_adapted, resize_decision
    run.val_missing = val_missing_classes(data_dir, classes)
    phases = plan_phases(cfg)
    if dist.is_main and not run.lr_find:
        print_header(run, model, device, dist, phases, start_epoch)
    # loop
    # Ctrl-C: stop after a whole step (on all processes); --lr-find keeps Python's own Ctrl-C (it saves nothing)
    stop = None if run.lr_find else StopRequest(device, collective=dist.enabled).install()
    try:
        run_phases(run, phases, model, device, dist, ckpt, start_epoch, stop)
    finally:  # SIGINT gets its handler back however the run ends
        if stop is not None:
            stop.uninstall()
    if run.lr_find:
        return run.lr_find
    # rank 0 alone from here: the other torchrun processes end now rather than wait for it in a barrier, which
    # times out after 30 minutes (utils/distributed.py COLLECTIVE_TIMEOUT; a large val folder)
    barrier()
    cleanup()
    if dist.is_main:
        calibrate_best(run, data_dir, device)  # temperature + reject threshold on val -> best.pt (docs/trust.md)
        print(done_line(run))
    return {"best_acc": run.best_acc, "last": run.row, "out": run.out}


def select_text(select_se: float) -> str:
    """Which epoch best.pt holds, in words: ``best`` or, with select_se, the latest one close to the best."""
    if select_se > 0:
        return f"the latest epoch within {select_se:g} standard error(s) of the best"
    return "best"


def done_line(run: Run) -> str:
    """``done: best val top-1 93.10% -> RUN/best.pt``, plus which epoch best.pt holds when select_se chose a later
    epoch than the best one."""
    line = f"done: best {run.best_name} {run.best_acc:.2f}% -> {os.path.join(run.out, 'best.pt')}"
    if run.kept is not None and run.kept["value"] < run.best_acc:
        line += (f" (holds epoch {run.kept['epoch']}, {run.kept['value']:.2f}%: the latest within "
                 f"{run.cfg.select_se:g} standard error(s), +-{run.best_se:.2f}, of the best; select_se)")
    return line


def calibrate_best(run: Run, data_dir: str, device: torch.device) -> None:
    """Fit temperature + reject threshold of best.pt on the val images and store them in it (docs/trust.md), so
    every export made from best.pt carries them. Runs on the training device."""

    best = os.path.join(run.out, "best.pt")
    if not os.path.isfile(best):
        return
    c, scores = calibrate_checkpoint(best, os.path.join(data_dir, "val"), DEFAULT_TARGET_ACCURACY, workers=None,
                                     device=str(device))
    print(f"calibration (val, {c['images']} images): temperature {c['temperature']:.3f}, ECE {c['ece_before']:.2f}% -> "
          f"{c['ece_after']:.2f}%; threshold {c['threshold']:.4f} answers {100 * c['coverage']:.1f}% of val at "
          f"{100 * c['target_accuracy']:g}% accuracy (fitted on val: optimistic there) -> stored in best.pt")
    print(exported_line(run, scores))


def exported_line(run: Run, scores: dict) -> str:
    """best.pt's val scores in fp32, as evaluate.py and the exported files give them; training validated in its
    own precision (bf16 autocast where the probe chose it), which can differ by a few images."""
    line = (f"best.pt on val in fp32 ({scores['engine']}), as evaluate.py and export.py will report it: top-1 "
            f"{scores['top1']:.2f}%, balanced accuracy {scores['balanced_acc']:.2f}%")
    if run.kept is not None:
        line += f" (training's validation of that epoch: {run.best_name} {run.kept['value']:.2f}%)"
    return line


def run_phases(run: Run, phases: list[Phase], model: nn.Module, device: torch.device, dist, ckpt: dict | None,
               start_epoch: int, stop: StopRequest | None) -> None:
    """Run the phases not yet done (a resumed run skips the finished ones and continues inside its own)."""
    for i, phase in enumerate(phases):
        if start_epoch >= phase.end:
            continue
        # the checkpoint's optimizer state belongs to this phase only if it was saved inside it
        inside = ckpt is not None and ckpt.get("phase", phase.name) == phase.name and (
            start_epoch > phase.first or bool(ckpt.get("partial_epoch")))
        run_phase(run, phase, phases, model, device, dist, ckpt if inside else None, max(start_epoch, phase.first),
                  stop, last=i == len(phases) - 1)
        if run.lr_find:  # the sweep covers the first phase only
            return


PHASE_TEXT = {"head": "classifier-only epoch{s} (backbone frozen)", "full": "whole-network epoch{s}"}


def phase_text(name: str, epochs: int) -> str:
    """``PHASE_TEXT[name]`` for ``epochs`` epochs ("1 whole-network epoch", "2 whole-network epochs")."""
    return PHASE_TEXT[name].format(s=plural_s(epochs))


def run_phase(run: Run, phase: Phase, phases: list[Phase], model: nn.Module, device: torch.device, dist,
              ckpt: dict | None, start_epoch: int, stop: StopRequest | None, last: bool) -> None:
    """Train ``model`` through one phase's epochs (from ``start_epoch``; ``ckpt``: resume inside this phase)."""
    cfg, main_proc = phase.cfg, run.main_proc
    frozen = cfg.freeze == "features"
    model.features.requires_grad_(not frozen)
    local_world = local_world_size(dist)
    cpu = machine.cpu_info()
    threads = machine.decide_threads(cpu, local_world)
    machine.apply_threads(threads)
    cached = frozen and cfg.cache_features
    workers = machine.decide_workers(cfg.workers, device, cpu, local_world, feature_pass=cached)
    data_dir = run.data_dir
    preprocess = Preprocess.from_config(cfg).as_dict()

    # ---- data (cached features: the frozen backbone reads every image once, see utils/deploy/engine.py)
    # Files left out of this phase's list: those known bad when it started (a resume inside the phase uses the
    # same set, not every file found since, so its epochs draw the same images in the same order).
    left_out = set((ckpt or {}).get("phase_left_out", run.unreadable))
    if cached:
        try:  # Ctrl-C stops the pass within a batch (one process; under torchrun at the first training step)
            data = cache_pooled_features(model, data_dir, preprocess, cfg.batch_size, workers.value, device,
                                         cfg.seed, dist.rank, dist.world_size, bar=main_proc and cfg.progress,
                                         engine=resumed_feature_engine(ckpt),
                                         stop=None if stop is None or dist.enabled else stop)
        except StopRequested:
            last_pt = os.path.join(run.out, "last.pt")
            print("\ninterrupted in the feature pass, before any step of this phase: " + (
                f"{last_pt} is unchanged (continue with --resume {last_pt})" if ckpt is not None else
                "nothing trained, nothing saved; run the same command again to start"), file=sys.stderr)
            raise
    else:

        data = load_data(data_dir, img_size=cfg.img_size, resize_size=cfg.resize_size, mean=cfg.mean, std=cfg.std,
                         batch_size=cfg.batch_size, workers=workers.value, augment=cfglib.augment_settings(cfg),
                         cache=cfg.cache, distributed=dist.enabled, seed=cfg.seed,
                         pin_memory=device.type == "cuda", progress=cfg.progress, augment_device=device,
                         known_unreadable=left_out,  # an earlier phase's bad files: same counts, one warning
                         resize_mode=cfg.resize_mode)
    train_loader, val_loader = data.train_loader, data.val_loader
    labels = ballib.train_labels(train_loader)
    balance = class_balance_plan(cfg, labels, run.classes, run.val_missing)
    if balance["class_balance"] in ballib.SAMPLER_POWER:  # the draw is a function of (seed, epoch): resume stays exact
        ballib.use_balanced_sampler(train_loader, labels, len(run.classes), balance["class_balance"])
    run.best_name = imblib.SELECT_NAMES[balance["select_metric"]]
    select_key = {"top1": "val_top1", "balanced_acc": "val_bal_acc"}[balance["select_metric"]]
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    # ---- speed choices (probed on this very model), precision, memory format
    budget_left = None  # a time budget not yet fitted fixes how long this (last) phase trains
    if last and run.cfg.time_budget and run.budget_fit is None:
        # rank 0's clock for every process: each started its own a moment apart, and the compile decision this
        # feeds is a collective probe that every torchrun process must take or skip together
        budget_left = broadcast_object(max(0.0, run.cfg.time_budget * 60 - run.elapsed()))
    # steps left: the recipe's epochs, or under a budget the most it may stretch to (the compile decision takes
    # the shorter of that and the budget)
    end = phase.first + BUDGET_MAX_FACTOR * (phase.end - phase.first) if budget_left is not None else phase.end
    plan = speed_plan(cfg, model, device, "features" if cached else data.cache, threads, workers,
                      len(run.classes), ckpt, 0 if cached else steps_per_epoch * (end - start_epoch), budget_left)
    if cached:
        plan.feature_engine = data.engine  # printed in the header, saved in config.yaml and the checkpoint
    machine.apply_plan(plan, device)
    amp_dtype, channels_last = plan.amp_dtype, bool(plan.channels_last.value)
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and ckpt is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])

    # ---- optimizer, schedule (this phase's own: re-warmed, cosine to its last epoch)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay, no_wd_norm_bias=cfg.no_wd_norm_bias,
                                backbone_lr_mult=cfg.backbone_lr_mult)
    # the global step this phase began at: now, or (resuming inside it) where its checkpoint says
    phase_start_step = run.step if ckpt is None else int((ckpt.get("scheduler") or {}).get("start_step", 0))

    def make_schedule(end: int) -> WarmupCosine:
        return WarmupCosine(cfg.lr, (end - phase.first) * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                            cfg.min_lr, start_step=phase_start_step)

    schedule = make_schedule(phase.end)
    scaler = torch.amp.GradScaler("cuda") if plan.grad_scaler else None
    partial = None
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{cfg.resume}: its optimizer state does not fit the current settings ({e}); resume "
                            "with the same optimizer, freeze and no_wd_norm_bias settings") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        partial = ckpt.get("partial_epoch")

    # ---- how a step calls the network: DDP / compile / frozen backbone
    net, head = model, model.classifier
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        if frozen:
            head = nn.parallel.DistributedDataParallel(model.classifier, device_ids=ids)
        else:
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    compiled_batch = 0
    if plan.compile.value:  # full batches run compiled, an odd-sized one eagerly (see Trainable)
        net, head = torch.compile(net), torch.compile(head)
        compiled_batch = cfg.batch_size
    trainable = Trainable(model, net, frozen=frozen, head=head, inputs_are_features=cached,
                          compiled_batch=compiled_batch, freeze_bn=cfg.freeze_bn)
    val_criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)  # unweighted: comparable across runs
    criterion = val_criterion
    if balance["class_balance"] == "loss":
        criterion = ballib.WeightedCrossEntropy(ballib.class_weights(list(balance["train_counts"].values())),
                                                cfg.label_smoothing)
    if cfg.logit_adjust:
        prior = ballib.draw_prior(list(balance["train_counts"].values()), balance["class_balance"])
        criterion = ballib.LogitAdjusted(criterion, prior, cfg.logit_adjust)
    criterion = criterion.to(device)  # class weights / offsets on the GPU: a per-step CPU copy would sync it
    # MixUp / CutMix mix images; cached features are pooled vectors of unaugmented images, so a classifier phase
    # on them trains without (CutMix cannot cut a vector) and the whole-network phase mixes its images
    mix = None if cached else build_mixup(cfg.mixup_alpha, cfg.cutmix_alpha, len(run.classes))
    ctx = StepContext(trainable, optimizer, criterion, device, amp_dtype, scaler, ema, mix, cfg.clip_grad_norm,
                      channels_last, [p for p in model.parameters() if p.requires_grad])
    if run.lr_find:  # the sweep only: writes RUN/lr_find.{csv,png}, no config.yaml, log or checkpoint

        # a classifier phase before the whole network takes its rate from head_lr, not lr
        flag = "--set head_lr=" if phase.name == "head" and len(phases) > 1 else "--lr"
        run.lr_find = run_lr_find(ctx, data, run.out, steps=min(run.lr_find["steps"], steps_per_epoch),
                                  lr_range=run.lr_find["lr_range"], seed=cfg.seed, bar=main_proc and cfg.progress,
                                  flag=flag, batch_size=cfg.batch_size)
        return

    def record() -> dict:
        phases_rec = [{"name": p.name, "epochs": [p.first + 1, p.end], "lr": p.cfg.lr} for p in phases]
        rec = {"speed": plan.record(), "phases": phases_rec, "class_balance_used": balance}
        if run.budget_fit:
            rec["time_budget_fit"] = run.budget_fit
        if run.bn_adapted:
            rec["bn_adapted"] = run.bn_adapted
        if run.resize_decision:
            rec["resize_mode_auto"] = run.resize_decision
        return rec

    if main_proc:
        cfglib.save_config(run.cfg, os.path.join(run.out, "config.yaml"), record=record())
        amp_text = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
        span = f"epoch {phase.end}" if phase.end == phase.first + 1 else f"epochs {phase.first + 1}-{phase.end}"
        print(f"{span}: {phase_text(phase.name, phase.end - phase.first)} | train {data.num_train} / val "
              f"{data.num_val} images | {amp_text[amp_dtype]}{' channels_last' if channels_last else ''} | "
              f"{steps_per_epoch} step{plural_s(steps_per_epoch)} per epoch | lr {cfg.lr:g}"
              f"{f' (backbone x{cfg.backbone_lr_mult:g})' if not frozen and cfg.backbone_lr_mult != 1 else ''}")
        print(f"speed choices on {plan.machine} (also in config.yaml):\n" + "\n".join(plan.lines()))
        print(f"class balance of train: {balance['described']}\n  class_balance {balance['class_balance']} "
              f"({balance['class_balance_reason']})\n  select_metric {balance['select_metric']}: best.pt = "
              f"{select_text(cfg.select_se)} {run.best_name} ({balance['select_metric_reason']})")
        if balance["val_missing"]:
            print(val_missing_line(balance["val_missing"], len(run.classes)))

    def save(name: str, epoch_done: int, part: EpochProgress | None = None) -> None:
        state = checkpoint_state(cfg, model, optimizer, schedule, scaler, ema, epoch_done, progress.step,
                                 run.best_acc, run.classes, plan, part, balance)
        state["config"] = cfglib.to_dict(run.cfg)  # the whole run's settings (every phase), not this phase's
        state.update(phase=phase.name, elapsed_s=run.elapsed(), time_budget_fit=run.budget_fit, best_se=run.best_se,
                     best_kept=run.kept, unreadable=sorted(run.unreadable), phase_left_out=sorted(left_out))
        save_checkpoint(os.path.join(run.out, name), state)

    # ---- loop
    eval_model = (ema.module if ema is not None else model)
    eval_fn = eval_model.classifier if cached else eval_model
    epoch = start_epoch
    while epoch < phase.end:
        data.set_epoch(epoch)
        t_epoch = time.perf_counter()
        progress = EpochProgress(step=run.step)
        if partial is not None:  # Ctrl-C stopped this epoch half-way: continue from the same batch and RNG
            progress = restore_partial(ckpt, dist.rank, device, run.step)
            partial = None
        else:
            torch.manual_seed(epoch_seed(cfg.seed, epoch, dist.rank))
        try:
            stats = train_one_epoch(ctx, train_loader, schedule, epoch + 1, progress,
                                    max_steps=cfg.max_steps_per_epoch, bar=main_proc and cfg.progress, stop=stop)
        except NonFiniteLoss as e:
            kept = os.path.join(run.out, "last.pt")
            kept = f"the last good checkpoint {kept} is kept" if os.path.isfile(kept) else "no checkpoint was written"
            raise UserError(f"training diverged: {e}; {kept}. Lower the learning rate (--lr), add warmup "
                            "(--set warmup_epochs=1) or clip gradients (--set clip_grad_norm=1.0)") from None
        except KeyboardInterrupt as e:
            if not isinstance(e, StopRequested):  # mid-step (a second Ctrl-C): the model is half-stepped
                where = f" on rank {dist.rank}" if dist.enabled else ""
                print(f"\ninterrupted mid-step{where}: no mid-epoch checkpoint (it would not resume exactly); "
                      "last.pt, if any, is from an epoch end", file=sys.stderr)
                raise
            progress.ranks = gather_rank_states(progress, device)  # every process's RNG state and sums
            if main_proc:
                save("last.pt", epoch, progress)
                print(f"\ninterrupted in epoch {epoch + 1} after {progress.batches_done} step"
                      f"{plural_s(progress.batches_done)}; saved "
                      f"{os.path.join(run.out, 'last.pt')} (continue with --resume {os.path.join(run.out, 'last.pt')})",
                      file=sys.stderr)
            barrier()  # no process exits before the file is written (torchrun would stop the others)
            raise
        run.step = progress.step
        t_val = time.perf_counter()
        val = validate(eval_fn, val_loader, val_criterion, device, amp_dtype=amp_dtype,
                       channels_last=ctx.channels_last, bar=main_proc and cfg.progress, num_classes=len(run.classes))
        seconds, val_seconds = time.perf_counter() - t_epoch, time.perf_counter() - t_val
        run.unreadable |= data.skipped_everywhere()  # every process calls it: under torchrun it unites their sets
        skipped = len(run.unreadable)
        se = {k: val.pop(k) for k in ("val_top1_se", "val_bal_acc_se")}  # for select_se; not logged
        run.row = row = {"epoch": epoch + 1, "lr": stats["lr"], "train_loss": stats["train_loss"],
                         "train_acc": stats["train_acc"], **val, "epoch_seconds": seconds,
                         "images_per_s": stats["images"] / max(progress.seconds, 1e-9),
                         "skipped_images": skipped}
        if last and (refits_budget(run, phase, epoch) or trims_budget(run, phase, epoch)):
            end = fit_to_budget(run, phase, epoch, seconds, finish_s=val_seconds,
                                trim_only=not refits_budget(run, phase, epoch))
            if end != phase.end:
                phase.end = end
                run.cfg = replace(run.cfg, epochs=end)
                schedule = make_schedule(end)
            if main_proc:  # every fit, with the epoch times it used
                cfglib.save_config(run.cfg, os.path.join(run.out, "config.yaml"), record=record())
        if main_proc:
            run.logger.log(row)
            print(summary_line(row, run.cfg.epochs), flush=True)
            if skipped:
                print(f"  skipped {skipped} unreadable image(s) so far; split_dataset.py's report.csv lists "
                      "bad files (re-split to drop them)", flush=True)
        is_best = keep_as_best(run, epoch + 1, val[select_key], se[select_key + "_se"])
        if main_proc:
            save("last.pt", epoch + 1)
            if is_best:
                save("best.pt", epoch + 1)
            plot_curves([os.path.join(run.out, "log.csv")], os.path.join(run.out, "curves.png"))
        if stop is not None and stop.requested_anywhere():  # Ctrl-C after the epoch's last check: stop here
            if main_proc:
                print(f"interrupted after epoch {epoch + 1}; saved {os.path.join(run.out, 'last.pt')} (continue with "
                      f"--resume {os.path.join(run.out, 'last.pt')})", file=sys.stderr)
            raise StopRequested
        epoch += 1


def keep_as_best(run: Run, epoch: int, value: float, se: float) -> bool:
    """Whether this epoch goes into best.pt; updates the best so far. With ``select_se`` 0, the epoch with the
    best value (the first of equals). With ``select_se`` k > 0, the latest epoch whose value is within k standard
    errors of the best epoch's (the one-standard-error rule): on a small val split the best of many noisy epochs
    is mostly luck; on held-out images the later epoch (further down the schedule) beat it in most runs measured
    (docs/finetune.md, "Which epoch becomes best.pt")."""
    improves = value > run.best_acc or epoch == 1  # epoch 1 fills best.pt even at 0%
    if improves:
        run.best_acc, run.best_se = value, se
    keep = improves or (run.cfg.select_se > 0 and value >= run.best_acc - run.cfg.select_se * run.best_se)
    if keep:
        run.kept = {"epoch": epoch, "value": value}
    return keep


BUDGET_MAX_FACTOR = 10  # --time-budget never stretches a phase past 10x the recipe's epochs


def refits_budget(run: Run, phase: Phase, epoch: int) -> bool:
    """Whether --time-budget fits the last phase's epochs after ``epoch`` (0-based): after its first epoch, then
    after every epoch in the first half of the phase. Epoch times on a shared machine vary by 10-20%, so each fit
    uses more of them; in the second half the end stays put, so the cosine schedule's tail is not moved. A
    checkpoint from before re-fitting keeps its one fit (it has no record of the recipe's epochs to cap it with)."""
    if not run.cfg.time_budget:
        return False
    if not run.budget_fit:
        return True
    return "epoch_seconds_seen" in run.budget_fit and 2 * (epoch + 1 - phase.first) <= phase.end - phase.first


def trims_budget(run: Run, phase: Phase, epoch: int) -> bool:
    """Whether --time-budget may end the last phase earlier after ``epoch``: in its second half, where
    :func:`refits_budget` no longer fits. Epochs that turn slower there (a busy host: 56 s became 59-69 s) would
    otherwise overrun the budget (30 minutes became 31.3); the end only ever moves earlier, never later."""
    return (bool(run.cfg.time_budget) and bool(run.budget_fit) and "epoch_seconds_seen" in run.budget_fit
            and not refits_budget(run, phase, epoch))


BUDGET_RECENT_EPOCHS = 5  # a trim judges the speed by the median of the last 5 epochs: a slowdown, not one slow epoch


def fit_to_budget(run: Run, phase: Phase, epoch: int, seconds: float, finish_s: float = 0.0,
                  trim_only: bool = False) -> int:
    """The epoch the last phase should end at so the run takes about ``time_budget`` minutes. Called after each
    epoch ``refits_budget`` allows, with that epoch's ``seconds`` (training + validation): the first fit uses the
    first epoch's time; later ones the median of the epochs after it, because the first carries one-time costs
    (kernel selection, a cache filling, a cold machine) that once cost a 30-minute run 11 of its minutes.
    ``trim_only`` (the second half, :func:`trims_budget`): the median of the last few epochs, and the end may only
    move earlier. ``finish_s`` is kept free for the work after the last epoch (the calibration of best.pt is one
    more pass over val: about one validation). Decided on rank 0 and shared with every process."""
    fit = run.budget_fit or {}
    seen = fit.get("epoch_seconds_seen", []) + [round(seconds, 2)]
    if len(seen) == 1:
        typical = seen[0]
    else:
        typical = statistics.median(seen[1:][-BUDGET_RECENT_EPOCHS:] if trim_only else seen[1:])
    budget = run.cfg.time_budget * 60
    left = budget - run.elapsed() - finish_s
    more = max(0, int(left // max(typical, 1e-6)))
    # from the recipe's epochs, fixed at the first fit (phase.end moves with every fit)
    cap = fit.get("cap", phase.first + BUDGET_MAX_FACTOR * (phase.end - phase.first))
    end = min(epoch + 1 + more, cap, phase.end if trim_only else cap)
    end = broadcast_object(end)
    changed = run.budget_fit is None or end != run.budget_fit["epochs"]
    run.budget_fit = {"epochs": end, "cap": cap, "epoch_seconds": typical, "epoch_seconds_seen": seen,
                      "finish_seconds": round(finish_s, 2), "minutes_spent": round(run.elapsed() / 60, 2),
                      "budget_minutes": run.cfg.time_budget}
    if run.main_proc and changed:
        capped = " (capped at 10x the recipe's epochs)" if end == cap and epoch + 1 + more > cap else ""
        if len(seen) == 1:
            took = f"an epoch takes {seconds_text(typical)}"
        elif trim_only:
            took = (f"the last {min(len(seen) - 1, BUDGET_RECENT_EPOCHS)} epochs took {seconds_text(typical)} "
                    "(median): slower than planned")
        else:
            took = f"epochs after the first take {seconds_text(typical)} (median; the first {seconds_text(seen[0])})"
        still = end - epoch - 1
        print(f"time budget {run.cfg.time_budget:g} min: {run.elapsed() / 60:.1f} min spent, {took} -> "
              f"{still} more epoch{plural_s(still)}, {end} in all{capped} (expected end after "
              f"~{(run.elapsed() + still * typical + finish_s) / 60:.1f} min)", flush=True)
    return end


if __name__ == "__main__":
    run_main(main)
