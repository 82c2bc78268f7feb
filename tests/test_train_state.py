"""The pieces behind exact resume and a GPU-friendly training loop, on the CPU: each process's RNG state and
sums saved and restored (utils.rank_state), SIGINT turned into a stop at a step boundary, loss/accuracy read
from the device only every few steps (train_one_epoch), the fused EMA update, and row sharding/gathering for
cached features (utils.distributed)."""
import os
import signal

import pytest
import torch
from eval_helpers import link_sample_split
from torch import nn
from train_helpers import train_cut_at_step

import train
from utils import rank_state as rs
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import gather_rows, interleave_shards, shard_indices
from utils.errors import UserError
from utils.schedule import WarmupCosine
from utils.train_loop import EMA, EpochProgress, NonFiniteLoss, PendingSums, StepContext, Trainable, train_one_epoch

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ per-rank state
def _rng(seed):
    torch.manual_seed(seed)
    return torch.get_rng_state()


def _two_rank_checkpoint(tmp_path):
    ranks = [{"rng": {"torch": _rng(11)}, "loss_sum": 1.5, "correct": 3, "seen": 8, "seconds": 0.25},
             {"rng": {"torch": _rng(22)}, "loss_sum": 2.75, "correct": 5, "seen": 8, "seconds": 0.5}]
    prog = EpochProgress(batches_done=1, step=6, loss_sum=1.5, correct=3, seen=8, seconds=0.25, ranks=ranks)
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"model": {}, "rng": ranks[0]["rng"], "partial_epoch": rs.partial_epoch_entry(prog)})
    return load_checkpoint(path)  # weights_only=True, as train.py reads it


def test_each_rank_restores_its_own_rng_state_and_sums(tmp_path):
    ckpt = _two_rank_checkpoint(tmp_path)
    assert ckpt["partial_epoch"]["world_size"] == 2
    for rank, seed, sums in ((0, 11, (1.5, 3, 8, 0.25)), (1, 22, (2.75, 5, 8, 0.5))):
        torch.manual_seed(999)
        p = rs.restore_partial(ckpt, rank, CPU, step=6)
        got = torch.rand(4)
        torch.manual_seed(seed)
        assert torch.equal(got, torch.rand(4)), rank  # continues exactly that rank's random stream
        assert (p.batches_done, p.step, p.loss_sum, p.correct, p.seen, p.seconds) == (1, 6, *sums)


def test_the_local_state_is_this_process_rng_and_sums():
    torch.manual_seed(5)
    prog = EpochProgress(batches_done=2, step=9, loss_sum=4.0, correct=7, seen=16, seconds=1.0)
    (state,) = rs.gather_rank_states(prog, CPU)  # not distributed: just this process
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state()) and "cuda" not in state["rng"]
    assert (state["loss_sum"], state["correct"], state["seen"], state["seconds"]) == (4.0, 7, 16, 1.0)


def test_single_process_checkpoints_without_ranks_still_restore():
    ckpt = {"rng": {"torch": _rng(33), "cuda": []},  # the older format: rank 0 only, cuda = get_rng_state_all()
            "partial_epoch": {"batches_done": 4, "loss_sum": 9.5, "correct": 11, "seen": 32, "seconds": 2.0}}
    torch.manual_seed(0)
    p = rs.restore_partial(ckpt, 0, CPU, step=12)
    got = torch.rand(3)
    torch.manual_seed(33)
    assert torch.equal(got, torch.rand(3))
    assert (p.batches_done, p.step, p.loss_sum, p.correct, p.seen, p.seconds) == (4, 12, 9.5, 11, 32, 2.0)
    rs.check_resume_world(ckpt, 1, "x.pt")  # written by one process: fine in one


def test_a_mid_epoch_checkpoint_needs_the_same_number_of_processes(tmp_path):
    ckpt = _two_rank_checkpoint(tmp_path)
    rs.check_resume_world(ckpt, 2, "run/last.pt")
    with pytest.raises(UserError) as e:
        rs.check_resume_world(ckpt, 1, "run/last.pt")
    assert "by 2 process(es), and this run has 1" in str(e.value)
    assert "`torchrun --nproc_per_node=2 train.py --resume run/last.pt`" in str(e.value)
    old = {"partial_epoch": {"batches_done": 1, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}}
    with pytest.raises(UserError, match="`python train.py --resume run/last.pt`"):
        rs.check_resume_world(old, 4, "run/last.pt")
    for world in (1, 3):  # an epoch-end checkpoint resumes with any number
        rs.check_resume_world({"partial_epoch": None}, world, "run/last.pt")


TINY = ["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--batch-size", "16", "--workers", "0",
        "--device", "cpu", "--set", "resize_size=32", "--set", "progress=false", "--set", "amp=off",
        "--epochs", "2", "--lr", "0.05", "--set", "warmup_epochs=1", "--set", "mixup_alpha=0.2"]


def test_old_format_mid_epoch_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    data = link_sample_split(str(tmp_path / "data"), 6, 2)  # 60 images: 4 steps per epoch
    train.main(TINY + ["--data", data, "--out", str(tmp_path / "full")])
    # a real Ctrl-C in the 2nd step of epoch 2: the run stops after it
    train_cut_at_step(monkeypatch, TINY + ["--data", data, "--out", str(tmp_path / "cut")], 5)
    ck = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert ck["partial_epoch"]["batches_done"] == 2 and ck["partial_epoch"]["world_size"] == 1
    del ck["partial_epoch"]["ranks"], ck["partial_epoch"]["world_size"]  # as written before per-rank states
    save_checkpoint(str(tmp_path / "cut" / "last.pt"), ck)
    train.main(["--resume", str(tmp_path / "cut" / "last.pt")])
    a, b = load_checkpoint(str(tmp_path / "full" / "last.pt")), load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ------------------------------------------------------------------------------------ the training loop
class Tiny(nn.Module):
    """Dropout draws from the global RNG, like the MobileNets' classifier dropout."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.classifier = nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(self.features(x))


def _batches(nan_at=None, signal_at=None, interrupt_at=None):
    g = torch.Generator().manual_seed(1)
    for i in range(10):
        size = 8 if i < 9 else 5
        x, y = torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g)
        if i == nan_at:
            x[0, 0] = float("nan")
        if i == signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        if i == interrupt_at:
            raise KeyboardInterrupt
        yield x, y


def _epoch(sync_every, stop=None, **batches):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = StepContext(Trainable(model), opt, nn.CrossEntropyLoss(), CPU, channels_last=False,
                      params=list(model.parameters()))
    progress = EpochProgress(step=20)
    result = None
    try:
        result = train_one_epoch(ctx, _batches(**batches), WarmupCosine(0.1, 40), 3, progress, total=10,
                                 sync_every=sync_every, stop=stop)
    except (NonFiniteLoss, KeyboardInterrupt) as e:
        result = e
    return progress, result, model


def _sums(p):
    return p.batches_done, p.step, p.loss_sum, p.correct, p.seen


def test_reading_sums_every_k_steps_gives_the_same_numbers_and_weights(monkeypatch):
    real_flush, reads = PendingSums.flush_into, []

    def counting_flush(self, progress, epoch):
        if len(self):
            reads.append(len(self))
        return real_flush(self, progress, epoch)

    monkeypatch.setattr(PendingSums, "flush_into", counting_flush)
    p1, stats1, m1 = _epoch(1)
    assert reads == [1] * 10
    reads.clear()
    p4, stats4, m4 = _epoch(4)
    assert reads == [4, 4, 2]  # three device reads in 10 steps: what spares a GPU nine syncs out of ten
    assert _sums(p1) == _sums(p4) and stats1 == stats4  # bit for bit, not approximately
    assert p1.seen == 77 and 0 < p1.correct < 77 and p1.step == 30
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m4.state_dict().values()))


def test_nan_loss_read_late_still_names_its_step():
    p1, e1, _ = _epoch(1, nan_at=5)
    p4, e4, _ = _epoch(4, nan_at=5)
    assert isinstance(e1, NonFiniteLoss) and isinstance(e4, NonFiniteLoss)
    assert str(e1) == str(e4) == "loss is nan at epoch 3, step 5 of the epoch (global step 25)"
    assert p1.batches_done == 6 and p4.batches_done == 8  # on a GPU the check comes up to k - 1 steps later
    assert (p1.loss_sum, p1.correct, p1.seen) == (p4.loss_sum, p4.correct, p4.seen) and p1.seen == 5 * 8


def test_an_interrupt_keeps_the_sums_of_every_batch_done():
    p1, e1, _ = _epoch(1, interrupt_at=6)
    p4, e4, _ = _epoch(4, interrupt_at=6)
    assert type(e1) is type(e4) is KeyboardInterrupt
    assert _sums(p1) == _sums(p4) and p4.batches_done == 6 and p4.seen == 6 * 8 and p4.seconds > 0


def test_sigint_with_stop_request_ends_the_epoch_after_the_current_step():
    # start from Python's own Ctrl-C handler, whatever an earlier test (or a library it loaded) installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with rs.StopRequest(CPU) as stop:
            p, e, _ = _epoch(4, stop=stop, signal_at=5)  # the signal arrives while batch 5 is being prepared
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert isinstance(e, rs.StopRequested)
        assert p.batches_done == 8 and p.seen == 8 * 8  # stop is checked (collectively) at the k-step reads
        p1, e1, _ = _epoch(1, stop=rs.StopRequest(CPU), signal_at=5)  # not installed: a KeyboardInterrupt
        assert type(e1) is KeyboardInterrupt and p1.batches_done == 5
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------ EMA
def test_ema_update_equals_the_reference_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    ema = EMA(model, 0.9)
    ref = {k: v.clone() for k, v in ema.state_dict().items()}
    for _ in range(3):
        model.train()
        model(torch.randn(5, 3, 8, 8))  # moves the BatchNorm running statistics and num_batches_tracked
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for name, p in model.named_parameters():  # ema = decay * ema + (1 - decay) * w, one tensor at a time
            ref[name] = torch.lerp(ref[name], p.detach(), 0.1)
        for name, b in model.named_buffers():
            ref[name] = b.clone()
    state = ema.state_dict()
    assert state.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    assert int(state["1.num_batches_tracked"]) == 3
    model[1].running_mean.add_(1.0)  # copies, not aliases of the model's buffers
    assert torch.equal(ema.state_dict()["1.running_mean"], ref["1.running_mean"])
    w = model[0].weight.detach()
    assert torch.allclose(state["0.weight"], ref["0.weight"]) and not torch.allclose(state["0.weight"], w)


# ------------------------------------------------------------------------------------ sharding and gathering
def test_shards_cover_every_row_once_and_interleave_back():
    for n in range(8):
        for world in (1, 2, 3):
            rows = [list(shard_indices(n, r, world)) for r in range(world)]
            assert sorted(i for r in rows for i in r) == list(range(n))
            full = torch.arange(n * 2).view(n, 2)
            if n >= world:
                assert torch.equal(interleave_shards([full[r] for r in rows], n), full)


def test_gather_rows_without_torchrun_is_the_identity():
    x = torch.randn(5, 3)
    assert gather_rows(x, 5) is x
    with pytest.raises(ValueError):
        gather_rows(x[:2], 5)


def _gather_worker(rank, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results = {}
        for n in (5, 1):  # 1 row: rank 1 has an empty shard and learns the row shape from rank 0
            full = torch.arange(n * 3, dtype=torch.float32).view(n, 3) * 1.5
            mine = full[list(shard_indices(n, rank, 2))] if len(shard_indices(n, rank, 2)) else torch.empty(0)
            results[n] = gather_rows(mine, n)
            # in pieces of 2 rows (24 bytes) per exchange: 3 rows on rank 0, 2 on rank 1 -> two exchanges
            results[(n, "chunked")] = gather_rows(mine, n, chunk_bytes=24)
        results["odd chunk"] = gather_rows(torch.arange(7 * 3)[rank::2], 21, chunk_bytes=17)  # 2 int64 rows of 1
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_rows_under_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        got = torch.load(f"{tmp_path / 'out'}.{rank}")
        for n in (5, 1):
            assert torch.equal(got[n], torch.arange(n * 3, dtype=torch.float32).view(n, 3) * 1.5), (rank, n)
            assert torch.equal(got[(n, "chunked")], got[n]), (rank, n)
        assert torch.equal(got["odd chunk"], torch.arange(21)), rank


@pytest.mark.parametrize("device_type, backend", [("cuda", "nccl"), ("cpu", "gloo")])
def test_init_distributed_picks_the_gpu_before_joining_and_waits_30_minutes(monkeypatch, device_type, backend):
    """Under torchrun on GPUs: each process selects its own GPU before the process group exists (NCCL's object
    collectives run on the current device), and a collective waits 30 minutes, not NCCL's 10, while rank 0
    alone runs a compile probe."""
    import datetime

    import utils.distributed as ud

    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(ud.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(ud.torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(ud.dist, "init_process_group", lambda b, **k: calls.append(("init", b, k["timeout"])))
    info = ud.init_distributed(device_type)
    assert (info.enabled, info.rank, info.world_size, info.local_rank, info.is_main) == (True, 1, 2, 1, False)
    first = [("set_device", 1)] if device_type == "cuda" else []
    assert calls == first + [("init", backend, datetime.timedelta(minutes=30))]
