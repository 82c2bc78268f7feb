"""The GPU paths of train.py on real Fashion-MNIST sample images; skipped cleanly without CUDA (``-m cuda``
selects them). This repository is developed on a CPU-only machine: these tests have NOT been run yet.

- AMP training on one GPU (``--device cuda``, ``amp: auto``): finite losses and weights, a GradScaler state
  exactly when fp16 autocast was used.
- Ctrl-C mid-epoch and resume on one GPU is bit-exact, as on the CPU. Exact, not within a tolerance: a
  tolerance loose enough for nondeterministic kernels would also accept a resume that replays the wrong dropout
  masks. So these runs make the GPU deterministic (tests/torchrun_driver.py ``DETERMINISTIC=1``: deterministic
  cuDNN/cuBLAS algorithms with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, cuDNN autotuning kept off).
- The training loop reads loss/accuracy from the GPU only every k steps (CUDA sync debug mode counts the
  synchronising calls; the every-step control shows that the count does see them).
- ``configs/finetune.yaml`` on one GPU: the classifier on cached features in fp32, then the whole network with
  autocast and MixUp/CutMix; Ctrl-C inside the whole-network phase then resume is bit-exact; ``--time-budget``
  ends the run after the epoch that spends it; ``--lr-find`` on the whole network (autocast, and the GradScaler
  where fp16 is chosen) writes only its csv and plot.
- With 2+ GPUs: DDP over nccl, Ctrl-C on one rank then resume is bit-exact (each rank's own CUDA RNG state),
  and cached features are encoded half per rank and all-gathered over nccl in file order.
"""
import csv
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import yaml
from eval_helpers import link_sample_split
from torch import nn
from torchrun_driver import ROOT, launch

from utils.checkpoint import load_checkpoint

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                              reason="needs 2 CUDA GPUs and nccl")

GPU = ["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--workers", "0", "--device", "cuda",
       "--set", "resize_size=32", "--set", "progress=false"]
# dropout 0.2 (the default) draws from the CUDA generator, mixup from the CPU one
RECIPE = ["--epochs", "3", "--lr", "0.02", "--set", "warmup_epochs=1", "--set", "ema_decay=0.9",
          "--set", "mixup_alpha=0.2", "--set", "label_smoothing=0.1"]
# the fine-tune recipe from scratch at the tiny size: 1 classifier epoch on cached features, 2 whole-network epochs
FINETUNE = ["--config", os.path.join(ROOT, "configs", "finetune.yaml"), "--pretrained", "none"] + GPU + \
    ["--batch-size", "16", "--epochs", "3", "--set", "head_epochs=1", "--set", "mixup_alpha=0.2",
     "--set", "cutmix_alpha=1.0"]
DETERMINISTIC = {"DETERMINISTIC": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return link_sample_split(str(tmp_path_factory.mktemp("fmnist")), 8, 4)  # 80 train / 40 val images


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_s")} for r in csv.DictReader(f)]


def _same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_amp_training_on_one_gpu(data, tmp_path):
    out = tmp_path / "amp"
    r = launch(GPU + ["--batch-size", "16", "--epochs", "2", "--lr", "0.02", "--data", data, "--out", str(out)], 1)
    assert "autocast" in r.stdout, r.stdout  # amp auto on CUDA: bf16 or fp16 autocast
    ck = load_checkpoint(str(out / "last.pt"))
    fp16 = "fp16 autocast" in r.stdout
    assert (ck["scaler"] is not None) == fp16, r.stdout
    if fp16:
        assert ck["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    rows = _rows(str(out / "log.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(math.isfinite(float(r["train_loss"])) for r in rows)


def test_ctrl_c_mid_epoch_on_one_gpu_then_resume_is_exact(data, tmp_path):
    args = GPU + RECIPE + ["--batch-size", "16", "--data", data]  # 5 steps per epoch
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(args + ["--out", str(full)], 1, DETERMINISTIC)
    # one process: SIGINT just before the 8th step (3rd of epoch 2); one process checks Ctrl-C after every step
    # (the GPU's values are still read every 20), so the run stops after that step (a stop mid-step would leave the
    # BatchNorm statistics half-updated)
    r = launch(args + ["--out", str(cut)], 1, dict(DETERMINISTIC, SIGINT_RANK="0", SIGINT_AT_STEP="7"), ok=False)
    assert r.returncode == 130 and "interrupted in epoch 2 after 3 steps" in r.stderr, r.stderr[-3000:]
    ck = load_checkpoint(str(cut / "last.pt"))
    assert ck["step"] == 8 and ck["partial_epoch"]["batches_done"] == 3
    assert "cuda" in ck["partial_epoch"]["ranks"][0]["rng"]  # the GPU's generator (dropout) is saved too
    launch(["--resume", str(cut / "last.pt")], 1, DETERMINISTIC)
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(cut / "last.pt"))
    assert a["step"] == b["step"] == 15
    assert _same(a["model"], b["model"]) and _same(a["ema"], b["ema"])
    assert _rows(str(full / "log.csv")) == _rows(str(cut / "log.csv"))


def test_finetune_recipe_on_one_gpu_ctrl_c_in_the_whole_network_phase_then_resume_is_exact(data, tmp_path):
    args = FINETUNE + ["--data", data]  # 80 images / 16: 5 steps per epoch
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = launch(args + ["--out", str(full)], 1, DETERMINISTIC)
    head, whole = r.stdout.split("epochs 2-3: whole-network epochs")
    assert "amp: fp32 - only the linear head trains, on cached features" in head, r.stdout
    assert "autocast" in whole.splitlines()[0], r.stdout  # amp auto: bf16 or fp16 in the whole-network phase
    with open(full / "config.yaml") as f:
        assert [p["name"] for p in yaml.safe_load(f)["phases"]] == ["head", "full"]
    # SIGINT just before the 8th step: the 3rd of epoch 2, the first whole-network epoch
    r = launch(args + ["--out", str(cut)], 1, dict(DETERMINISTIC, SIGINT_RANK="0", SIGINT_AT_STEP="7"), ok=False)
    assert r.returncode == 130 and "interrupted in epoch 2 after 3 steps" in r.stderr, r.stderr[-3000:]
    assert load_checkpoint(str(cut / "last.pt"))["phase"] == "full"
    launch(["--resume", str(cut / "last.pt")], 1, DETERMINISTIC)
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(cut / "last.pt"))
    assert a["step"] == b["step"] == 15 and a["phase"] == b["phase"] == "full"
    assert (a["scaler"] is not None) == ("fp16 autocast" in whole)
    assert _same(a["model"], b["model"])
    assert _rows(str(full / "log.csv")) == _rows(str(cut / "log.csv"))


def test_time_budget_and_lr_find_of_the_finetune_recipe_on_one_gpu(data, tmp_path):
    out = tmp_path / "budget"
    # 0.0005 minutes (30 ms) are spent before the first whole-network epoch ends: that epoch is the last
    r = launch(FINETUNE + ["--epochs", "4", "--data", data, "--out", str(out), "--time-budget", "0.0005"], 1)
    assert "time budget 0.0005 min:" in r.stdout, r.stdout
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["epoch"] == 2 and ck["time_budget_fit"]["epochs"] == 2
    assert [r["epoch"] for r in _rows(str(out / "log.csv"))] == ["1", "2"]
    out = tmp_path / "lr_find"
    r = launch(FINETUNE + ["--set", "head_epochs=0", "--data", data, "--out", str(out), "--lr-find",
                           "--lr-find-steps", "5", "--lr-find-range", "1e-5", "1e-2"], 1)
    assert sorted(os.listdir(out)) == ["lr_find.csv", "lr_find.png"], r.stdout  # no checkpoint, config or log
    with open(out / "lr_find.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(math.isfinite(float(row["loss"])) for row in rows), rows
    assert "suggested lr" in r.stdout


def test_training_loop_reads_the_gpu_only_every_k_steps():
    from models import build_model
    from utils.schedule import WarmupCosine
    from utils.train_loop import EpochProgress, StepContext, Trainable, train_one_epoch

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=10, width_mult=0.25).to(device)
    ctx = StepContext(Trainable(model), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                      nn.CrossEntropyLoss(), device, channels_last=False, params=list(model.parameters()))
    g = torch.Generator().manual_seed(0)
    # batches already on the GPU: only the loop's own synchronisations are counted, not the loader's
    batches = [(torch.randn(8, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device))
               for _ in range(24)]
    schedule = WarmupCosine(0.01, 1000)
    train_one_epoch(ctx, batches[:2], schedule, 1, EpochProgress(), sync_every=1)  # first-call allocations, cuDNN
    torch.cuda.synchronize()

    def syncs(sync_every):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(ctx, batches, schedule, 1, EpochProgress(), sync_every=sync_every)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

    every_step, deferred = syncs(1), syncs(100)
    assert len(every_step) >= 24, every_step  # the count does see a read per step
    assert len(deferred) <= 3, deferred  # one read at the end of the epoch, not one per step


@two_gpus
def test_ddp_nccl_ctrl_c_on_one_rank_then_resume_is_exact(data, tmp_path):
    args = GPU + RECIPE + ["--batch-size", "8", "--data", data]  # 2 x 8: 5 steps per epoch
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(args + ["--out", str(full)], 2, DETERMINISTIC)
    # rank 1 alone gets SIGINT before its 8th step; with reads every 2 steps both stop after the 4th of epoch 2
    r = launch(args + ["--out", str(cut)], 2, dict(DETERMINISTIC, SIGINT_RANK="1", SIGINT_AT_STEP="7", SYNC_EVERY="2"),
               ok=False)
    assert "interrupted in epoch 2 after 4 steps" in r.stderr, r.stderr[-3000:]
    part = load_checkpoint(str(cut / "last.pt"))["partial_epoch"]
    assert part["world_size"] == 2 and part["batches_done"] == 4
    r0, r1 = part["ranks"]
    assert not torch.equal(r0["rng"]["cuda"], r1["rng"]["cuda"])  # each GPU's own dropout stream
    launch(["--resume", str(cut / "last.pt")], 2, DETERMINISTIC)
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(cut / "last.pt"))
    assert a["step"] == b["step"] == 15
    assert _same(a["model"], b["model"]) and _same(a["ema"], b["ema"])
    assert _rows(str(full / "log.csv")) == _rows(str(cut / "log.csv"))


@two_gpus
def test_ddp_nccl_cached_features_are_sharded_then_gathered_in_order(data, tmp_path):
    args = GPU + ["--batch-size", "8", "--epochs", "1", "--data", data, "--freeze", "features", "--pretrained", "none",
                  "--set", "cache_features=true", "--set", "amp=off"]
    launch(args + ["--out", str(tmp_path / "one")], 1, dict(DETERMINISTIC, DUMP_FEATURES=str(tmp_path / "f1")))
    launch(args + ["--out", str(tmp_path / "two")], 2, dict(DETERMINISTIC, DUMP_FEATURES=str(tmp_path / "f2")))
    one = torch.load(str(tmp_path / "f1" / "rank0.pt"), weights_only=True)
    r0, r1 = (torch.load(str(tmp_path / "f2" / f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    assert one["encoded"] == 120 and r0["encoded"] == r1["encoded"] == 60  # each image encoded on one GPU
    for k in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(r0[k], r1[k]), k  # every rank holds the same gathered tensors
    assert torch.equal(r0["train_y"], one["train_y"]) and torch.equal(r0["val_y"], one["val_y"])
    for k in ("train_x", "val_x"):
        # A batch of another size (the last val batch: 4 per GPU vs 8) may get another cuDNN kernel (TF32 too), so
        # not bit-equal; but every row holds the same image's features: nearest to its own row of the 1-GPU run,
        # and close to it relative to the features' scale (a random-init backbone's are ~1e-6).
        a, b = r0[k].double(), one[k].double()
        assert torch.equal(torch.cdist(a, b).argmin(1), torch.arange(len(a))), k
        assert (a - b).abs().max() <= 1e-2 * b.abs().max(), k


def test_memory_cache_augments_on_the_gpu_like_on_the_cpu(data):
    """The GPU path of the memory loader (uint8 batches cross over, augmentation runs there) draws the same
    crops, flips, jitter and erasing as the CPU path: same pixels up to float rounding of grid_sample."""
    from utils.data import load_data
    from utils.machine import cpu_info, decide_threads, decide_workers, plan_training

    common = dict(img_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=16, workers=0,
                  augment={"scale": (0.3, 1.0), "hflip": 0.5, "color_jitter": 0.4, "rotation": 10,
                           "random_erasing": 0.5}, cache="memory", seed=3, progress=False)
    cpu_b = load_data(data, **common)
    gpu_b = load_data(data, **common, pin_memory=True, augment_device=torch.device("cuda"))
    cpu_b.set_epoch(1)
    gpu_b.set_epoch(1)
    for (xc, yc), (xg, yg) in zip(cpu_b.train_loader, gpu_b.train_loader):
        assert xg.is_cuda and yg.is_cuda and torch.equal(yc, yg.cpu())
        assert (xc - xg.cpu()).abs().max() < 1e-3
    for (xc, _), (xg, _) in zip(cpu_b.val_loader, gpu_b.val_loader):
        assert xg.is_cuda and torch.allclose(xc, xg.cpu(), atol=1e-6)
    device = torch.device("cuda", 0)
    plan = plan_training(device=device, amp="auto", channels_last="auto", cache="memory",
                         workers=decide_workers(-1, device, cpu_info()), threads=decide_threads(cpu_info(), 1))
    assert plan.augment_device.value == "cuda" and plan.cudnn_benchmark.value is True
