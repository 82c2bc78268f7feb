"""utils.machine: every automatic speed choice, for this CPU, simulated older CPUs and faked GPUs."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from eval_helpers import link_sample_split

from utils import machine as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
ZEN2 = M.CpuInfo("AMD EPYC 7R32", 2, ("avx2",), "AVX2", False)
SAPPHIRE = M.CpuInfo("Intel Xeon 8488C", 2, ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"),
                     "AVX512", True)
SKYLAKE = M.CpuInfo("Intel Xeon 8175M", 2, ("avx2", "avx512f"), "AVX512", True)  # bf16 only by conversion
T4 = M.GpuInfo("Tesla T4", (7, 5))
A100 = M.GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0))
P100 = M.GpuInfo("Tesla P100", (6, 0))


def _python(code, env_extra):
    env = dict(os.environ, **env_extra)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


# ------------------------------------------------------------------------------------------- GPU (faked)
def test_cuda_amp_by_compute_capability():
    for gpu, mode in [(T4, "auto"), (T4, "on"), (P100, "auto")]:
        c = M.cuda_amp(mode, gpu)
        assert c.value == torch.float16 and "GradScaler" in c.reason and f"sm_{gpu.capability[0]}" in c.reason
    for mode in ("auto", "on"):
        c = M.cuda_amp(mode, A100)
        assert c.value == torch.bfloat16 and "sm_80" in c.reason and "no GradScaler" in c.reason
    assert M.cuda_amp("off", A100).value is None


def _gpu_plan(gpu, amp="auto", channels_last="auto", cache="memory", workers=-1, cpu=ZEN2):
    device = torch.device("cuda", 0)
    return M.plan_training(device=device, amp=amp, channels_last=channels_last, cache=cache,
                           workers=M.decide_workers(workers, device, cpu), threads=M.decide_threads(cpu, 1),
                           cpu=cpu, gpu=gpu)


def test_gpu_plan_scaler_layout_cudnn_and_augmentation():
    t4, a100 = _gpu_plan(T4), _gpu_plan(A100)
    assert t4.amp_dtype == torch.float16 and t4.grad_scaler
    assert a100.amp_dtype == torch.bfloat16 and not a100.grad_scaler
    assert t4.channels_last.value is True and a100.channels_last.value is True  # tensor cores: NHWC
    assert _gpu_plan(P100).channels_last.value is False  # no tensor cores before sm_70: cuDNN's NCHW kernels
    assert _gpu_plan(A100, amp="off").channels_last.value is False
    assert _gpu_plan(T4, channels_last="off").channels_last.value is False
    for plan in (t4, a100):
        assert plan.cudnn_benchmark.value is True
        assert plan.augment_device.value == "cuda"  # memory cache: uint8 batches cross over, augmented on the GPU
        assert plan.workers.value == 0 and plan.probe == {}
    disk = _gpu_plan(A100, cache="none", cpu=M.CpuInfo("x", 16, ("avx2",), "AVX2", False))
    assert disk.workers.value == 14 and disk.augment_device.value == "workers"  # 2500 / 180 img/s wants 14
    assert _gpu_plan(A100, cache="none").workers.value == 1  # 2 cores: one for the loop, one worker
    assert _gpu_plan(A100, cache="none", workers=6).workers.value == 6  # the user's number wins
    inline = _gpu_plan(A100, cache="none", workers=0)  # no workers: the header must not claim they augment
    assert inline.augment_device.value == "main process" and "no decode workers" in inline.augment_device.reason
    rec = a100.record()
    assert rec["amp"] == {"value": "bf16", "reason": a100.amp.reason} and "A100" in rec["machine"]


def test_apply_plan_sets_the_cuda_device_and_cudnn_autotuning(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    M.apply_plan(_gpu_plan(T4), torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark is True


# ------------------------------------------------------------------------------------------- CPU decisions
def _fake_probe(times):
    seen = []

    def probe(variants):
        seen.append([M.variant_name(v) for v in variants])
        out = {M.variant_name(v): times[M.variant_name(v)] for v in variants}
        out.update({M.first_step_name(v): times[M.first_step_name(v)] for v in variants
                    if M.first_step_name(v) in times})
        return out, False

    return probe, seen


def test_cpu_without_bf16_kernels_never_probes_bf16():
    probe, seen = _fake_probe({"fp32 channels_last": 1.0, "fp32 NCHW": 1.3})
    amp, cl, times = M.decide_cpu_precision("auto", "auto", ZEN2, probe)
    assert seen == [["fp32 channels_last", "fp32 NCHW"]]
    assert amp.value is None and amp.reason.startswith("bf16 ruled out without a probe: oneDNN has no bf16 kernels")
    assert cl.value is True and cl.reason == "fp32 NCHW 1.30x the time per step in a probe"


def test_bf16_only_where_the_probe_measures_it_faster():
    fast = {"fp32 channels_last": 1.0, "fp32 NCHW": 1.6, "bf16 channels_last": 0.55}
    probe, seen = _fake_probe(fast)
    amp, cl, _ = M.decide_cpu_precision("auto", "auto", SAPPHIRE, probe)
    assert seen == [["fp32 channels_last", "fp32 NCHW", "bf16 channels_last"]]
    assert amp.value == torch.bfloat16 and cl.value is True
    assert amp.reason == "fp32 channels_last 1.82x the time per step in a probe"
    slow = {"fp32 channels_last": 1.0, "fp32 NCHW": 1.6, "bf16 channels_last": 9.5}
    amp, cl, _ = M.decide_cpu_precision("auto", "auto", SKYLAKE, _fake_probe(slow)[0])
    assert amp.value is None and amp.reason == ("bf16 is emulated on this CPU (bf16 channels_last 9.50x the time per "
                                                "step in a probe)")
    # within 3% counts as a tie: the earlier candidate (fp32 channels_last) wins, so reruns do not flip
    tie = {"fp32 channels_last": 1.02, "fp32 NCHW": 1.0, "bf16 channels_last": 1.01}
    amp, cl, _ = M.decide_cpu_precision("auto", "auto", SAPPHIRE, _fake_probe(tie)[0])
    assert amp.value is None and cl.value is True


def test_user_settings_win_over_the_probe():
    probe, seen = _fake_probe({"bf16 channels_last": 1.0, "bf16 NCHW": 2.0})
    amp, cl, _ = M.decide_cpu_precision("on", "auto", ZEN2, probe)  # amp: on is obeyed even where emulated
    assert amp.value == torch.bfloat16 and amp.reason == "set by the user" and cl.value is True
    probe, seen = _fake_probe({})
    amp, cl, times = M.decide_cpu_precision("off", "off", SAPPHIRE, probe)
    assert (amp.value, cl.value, times, seen) == (None, False, {}, [])
    assert M.decide_workers(3, torch.device("cpu"), ZEN2).value == 3
    assert M.decide_workers(-1, torch.device("cpu"), ZEN2).value == 1


def test_compile_is_probed_only_on_long_runs_and_chosen_only_where_it_pays():
    best = (True, None)
    # 0.5 s per step x 1,000 steps = 8 minutes: compiling would not pay back, so it is not even probed
    probe, seen = _fake_probe({})
    c, times = M.decide_compile("auto", best, features_only=False, run_steps=1000, est_step_s=0.5, probe=probe)
    assert c.value is False and seen == [] and times == {}
    assert c.reason == ("not probed: compiling (a minute or more) would hardly pay back in an estimated 8-minute run "
                        "(compile: on forces it)")
    # 2 s per step x 1,800 steps = 60 minutes; compiled steps 1.25x as fast save 12 minutes against 70 s: on
    fast = {"eager fp32 channels_last": 2.0, "compiled fp32 channels_last": 1.6,
            "compiled fp32 channels_last (first step)": 70.0}
    probe, seen = _fake_probe(fast)
    c, times = M.decide_compile("auto", best, features_only=False, run_steps=1800, est_step_s=2.0, probe=probe)
    assert seen == [["eager fp32 channels_last", "compiled fp32 channels_last"]]
    assert c.value is True and c.reason == ("compiled steps 1.25x as fast in a probe; 12 of an estimated 60 minutes "
                                            "saved against 70 s of compiling")
    assert times["compiled fp32 channels_last"] == 1.6
    # 1.03x is within the noise: eager
    slow = dict(fast, **{"compiled fp32 channels_last": 1.94})
    c, _ = M.decide_compile("auto", best, features_only=False, run_steps=1800, est_step_s=2.0,
                            probe=_fake_probe(slow)[0])
    assert c.value is False and c.reason.startswith("not worth it: compiled steps 1.03x as fast")
    # faster steps, but the run is too short to win back a 20-minute compile (probe + run)
    long_compile = dict(fast, **{"compiled fp32 channels_last (first step)": 1200.0})
    c, _ = M.decide_compile("auto", best, features_only=False, run_steps=1800, est_step_s=2.0,
                            probe=_fake_probe(long_compile)[0])
    assert c.value is False
    # a time budget fixes the run's length: 30 minutes left, no eager probe needed, 1.25x saves 6 minutes
    probe, seen = _fake_probe(fast)
    c, _ = M.decide_compile("auto", best, features_only=False, run_steps=10**6, est_step_s=None, probe=probe,
                            run_s=1800.0)
    assert seen == [["eager fp32 channels_last", "compiled fp32 channels_last"]] and c.value is True
    assert c.reason.endswith("6 of an estimated 30 minutes saved against 70 s of compiling")
    c, _ = M.decide_compile("auto", best, features_only=False, run_steps=10**6, est_step_s=2.0,
                            probe=_fake_probe(fast)[0], run_s=600.0)
    assert c.value is False and c.reason.startswith("not probed") and "10-minute run" in c.reason
    # a 600-minute budget whose epoch cap (run_steps) ends the run after 150 steps of 2 s: a 5-minute run, not
    # worth a compile probe (it once cost 51 s of a run planned at 5.1 minutes)
    c, _ = M.decide_compile("auto", best, features_only=False, run_steps=150, est_step_s=2.0,
                            probe=_fake_probe(fast)[0], run_s=600 * 60.0)
    assert c.value is False and c.reason.startswith("not probed") and "5-minute run" in c.reason
    c, _ = M.decide_compile("auto", best, features_only=False, run_steps=20, est_step_s=2.0, probe=probe)
    assert "an estimated 40-second run" in c.reason  # not "0-minute"
    # unknown step time: the eager variant is probed first (at the small probe batch, scaled up to the real one)
    probe, seen = _fake_probe({"fp32 channels_last": 0.5, **fast})
    c, _ = M.decide_compile("auto", best, features_only=False, run_steps=1800, est_step_s=None, probe=probe,
                            batch_scale=4.0)
    assert seen[0] == ["fp32 channels_last"] and c.value is True


def test_compile_failure_user_settings_and_cached_features():
    def broken(variants):
        if any(len(v) > 2 for v in variants):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return {M.variant_name(v): 2.0 for v in variants}, False

    c, _ = M.decide_compile("auto", (False, None), features_only=False, run_steps=5000, est_step_s=2.0, probe=broken)
    assert c.value is False
    assert c.reason == "torch.compile failed in a probe (RuntimeError: InvalidCxxCompiler: No working C++ compiler found)"
    for mode, want in (("on", True), ("off", False)):
        c, times = M.decide_compile(mode, (False, None), features_only=False, run_steps=5000, est_step_s=2.0,
                                    probe=broken)
        assert (c.value, c.reason, times) == (want, "set by the user", {})
    c, _ = M.decide_compile("auto", (False, None), features_only=True, run_steps=5000, est_step_s=2.0, probe=broken)
    assert c.value is False and c.reason == "only the linear head trains, on cached features"


@pytest.mark.parametrize("cpu, gpu", [(SAPPHIRE, None), (ZEN2, None), (ZEN2, T4), (ZEN2, A100)])
def test_classifier_on_cached_features_trains_in_fp32_without_a_probe_and_says_why(cpu, gpu):
    """The head phase of finetune.yaml (amp and channels_last left on auto): fp32, NCHW, no probe, and the reason
    printed is the cached features, not "set by the user" (the user set nothing)."""
    def probe(variants):
        raise AssertionError(f"probed {variants}")

    plan = M.plan_training(device=torch.device("cuda" if gpu else "cpu"), amp="auto", channels_last="auto",
                           cache="features", workers=M.Choice(0, "x"), threads=M.Choice(2, "x"), probe=probe,
                           cpu=cpu, gpu=gpu, compile="auto", run_steps=100_000, images_per_step=32)
    why = "only the linear head trains, on cached features"
    assert (plan.amp.value, plan.amp.reason) == (None, why)
    assert (plan.channels_last.value, plan.channels_last.reason) == (False, why)
    assert (plan.compile.value, plan.compile.reason) == (False, why) and plan.probe == {}


def test_gpu_plan_estimates_the_run_from_the_gpu_rate(monkeypatch):
    fake, seen = _fake_probe({"eager bf16 channels_last": 0.02, "compiled bf16 channels_last": 0.015,
                              "compiled bf16 channels_last (first step)": 40.0})
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    autotuned = []

    def probe(variants):  # the compile probe times steps as training runs them: with cuDNN autotuning
        autotuned.append(torch.backends.cudnn.benchmark)
        return fake(variants)

    plan = M.plan_training(device=torch.device("cuda"), amp="auto", channels_last="auto", cache="none",
                           workers=M.Choice(8, "x"), threads=M.Choice(2, "x"), probe=probe, cpu=ZEN2, gpu=A100,
                           compile="auto", run_steps=100_000, images_per_step=256)
    # 256 / 2,500 img/s x 100,000 steps = 171 minutes estimated: worth a probe, and 1.33x pays back
    assert seen == [["eager bf16 channels_last", "compiled bf16 channels_last"]]
    assert plan.compile.value is True and plan.record()["compile"]["value"] is True
    assert "compiled bf16 channels_last" in plan.record()["probe_s_per_step"]
    assert autotuned == [True]


def test_threads_split_between_local_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert M.decide_threads(M.CpuInfo("x", 8, (), "AVX2", False), 2).value == 4
    assert M.decide_threads(ZEN2, 4).value == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "set in the environment" in M.decide_threads(ZEN2, 1).reason


def test_probe_is_cached_per_machine_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENET_CACHE_DIR", str(tmp_path))
    calls = []

    def factory(variant):
        def step():
            calls.append(M.variant_name(variant))
        return step

    variants = [(True, None), (False, None)]
    t1, cached1 = M.probe_variants(factory, variants, ZEN2, {"img_size": 32})
    t2, cached2 = M.probe_variants(factory, variants, ZEN2, {"img_size": 32})
    assert (cached1, cached2) == (False, True) and t1 == t2
    assert len(calls) == 2 * (1 + M.PROBE_STEPS)  # one warm-up and PROBE_STEPS timed steps each, measured once
    _, cached3 = M.probe_variants(factory, variants, ZEN2, {"img_size": 48})
    _, cached4 = M.probe_variants(factory, variants, SAPPHIRE, {"img_size": 32})
    assert not cached3 and not cached4
    assert len(json.load(open(tmp_path / "probe.json"))) == 3


def test_the_precision_probe_runs_at_the_recipes_own_batch():
    """Per-image cost depends on the batch (caches): on a Zen 4 at 224 px fp32 channels_last tied bf16 at batch 10
    and took 1.9x its time at batch 32. So the probe times the recipe's real batch, for every CPU recipe shipped."""
    for name in ("default", "finetune", "cifar10"):
        cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", f"{name}.yaml")))
        assert M.probe_batch(cfg["batch_size"], cfg["img_size"]) == cfg["batch_size"], name
    assert M.probe_batch(256, 224) == 41  # ImageNet's batch on a CPU would make a probe of minutes: capped


# ------------------------------------------------------------------------------------------- simulated CPUs
def test_cpu_info_follows_the_simulation_variables():
    code = ("from utils.machine import cpu_info; c = cpu_info(); "
            "print(' '.join(c.features)); print(c.aten_isa, c.onednn_bf16, c.native_bf16)")
    feats, flags = _python(code, AVX2_ONLY).strip().splitlines()
    assert "avx512f" not in feats.split() and "avx512_bf16" not in feats.split()
    assert flags == "AVX2 False False"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return link_sample_split(str(tmp_path_factory.mktemp("fm")), 8, 4)


def test_train_py_on_a_simulated_avx2_cpu_chooses_fp32(sample, tmp_path):
    """The real command in a subprocess that sees an AVX2-only CPU: bf16 is never picked (nor probed), and the
    header, config.yaml and the checkpoint say why."""
    out = tmp_path / "run"
    env = dict(AVX2_ONLY, MOBILENET_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", sample, "--out", str(out),
                        "--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--epochs", "1",
                        "--batch-size", "16", "--device", "cpu", "--set", "progress=false"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, **env), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    speed = yaml.safe_load(open(out / "config.yaml"))["speed"]
    assert speed["amp"]["value"] == "fp32"
    assert speed["amp"]["reason"].startswith("bf16 ruled out without a probe: oneDNN has no bf16 kernels")
    assert "avx512" not in speed["machine"] and "ATen AVX2" in speed["machine"]
    assert set(speed["probe_s_per_step"]) == {"fp32 channels_last", "fp32 NCHW"}
    assert "amp: fp32 - bf16 ruled out" in r.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["speed"] == speed


def test_a_run_config_given_back_as_recipe_ignores_the_record(sample, tmp_path):
    import train

    train.main(["--data", sample, "--out", str(tmp_path / "a"), "--model", "mobilenet_v2", "--width-mult", "0.25",
                "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                "--set", "progress=false", "--set", "max_steps_per_epoch=1"])
    again = train.main(["--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b")])
    assert again["last"]["epoch"] == 1


def test_the_speed_probe_never_joins_a_collective_of_synced_batchnorm(tmp_path):
    """Under torchrun rank 0 probes alone while the others wait in a broadcast: a synced BatchNorm in the probe's
    copy would join a collective the others never enter (nn.SyncBatchNorm on a GPU: a hang until NCCL's watchdog
    aborts). The copy computes plain statistics; the model keeps its synced layers. One gloo process here: CPU
    input already makes nn.SyncBatchNorm raise where it would sync."""
    import torch.distributed as dist

    from models import build_model
    from utils.distributed import CPUSyncBatchNorm, local_batchnorm
    from utils.train_loop import make_probe_step

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model("mobilenet_v2", num_classes=3,
                                                                          width_mult=0.25)).train()
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            model(torch.randn(2, 3, 32, 32))  # what the probe's copy did before
        state = {k: v.clone() for k, v in model.state_dict().items()}
        step = make_probe_step(model, frozen=False, device=torch.device("cpu"), batch=2, img_size=32, num_classes=3)
        step((False, None))()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model is untouched
        assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == 52
        local = local_batchnorm(torch.nn.Sequential(torch.nn.SyncBatchNorm(4),
                                                    torch.nn.Sequential(CPUSyncBatchNorm(4))))
        assert type(local[0]) is torch.nn.BatchNorm2d and not local[1][0].synced
    finally:
        dist.destroy_process_group()
