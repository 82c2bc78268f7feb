"""What this machine is, and every automatic speed choice that follows from it: one place, one record.

Choices are made from capabilities (CPU instruction sets as oneDNN and ATen see them, the GPU's compute
capability) and, where capabilities are not enough, from a short measured probe of the real training step.
Each choice carries its reason; ``train.py`` prints them in the run header and saves them in ``config.yaml``.
A value the user sets explicitly (``amp: on|off``, ``channels_last: on|off``, ``workers: N``) always wins.

Simulating another CPU: ``ONEDNN_MAX_CPU_ISA=AVX2`` and ``ATEN_CPU_CAPABILITY=avx2`` make oneDNN and ATen
behave as on an AVX2-only CPU; :func:`cpu_info` reads the features through them, so the decisions follow.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torchvision

from utils.files import write_json

# CPU features that matter for speed, by the names Linux's /proc/cpuinfo uses.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd",
            "asimddp", "sve")
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")  # single-instruction u8 x s8 dot products
# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) -> the features it leaves visible (x86).
_ONEDNN_CAPS = {
    "SSE41": set(),
    "AVX": set(),
    "AVX2": {"avx2"},
    "AVX2_VNNI": {"avx2", "avx_vnni"},
    "AVX2_VNNI_2": {"avx2", "avx_vnni"},
    "AVX512_CORE": {"avx2", "avx512f"},
    "AVX512_CORE_VNNI": {"avx2", "avx512f", "avx512_vnni"},
    "AVX512_CORE_BF16": {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"},
}


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as the libraries see it (simulation variables applied)."""

    model: str
    cores: int
    features: tuple[str, ...]  # subset of FEATURES
    aten_isa: str  # ATen's vector kernels: DEFAULT | AVX2 | AVX512 | ...
    onednn_bf16: bool  # oneDNN has bf16 convolutions here (False: bf16 autocast falls back to slow kernels)

    @property
    def int8_dot(self) -> bool:
        """u8 x s8 dot products in one instruction (VNNI, AMX or ARM dot-product): int8 pays and never saturates."""
        return any(f in self.features for f in INT8_DOT)

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512-BF16 or AMX), not converted to fp32 and back by software."""
        return self.onednn_bf16 and any(f in self.features for f in ("avx512_bf16", "amx_bf16"))

    def describe(self) -> str:
        feats = " ".join(self.features) or "no avx2"
        return f"{self.model}, {self.cores} cores ({feats}; ATen {self.aten_isa})"


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device."""

    name: str
    capability: tuple[int, int]
    index: int = 0

    @property
    def bf16(self) -> bool:
        """Tensor-core bf16 (Ampere, sm_80, and later)."""
        return self.capability >= (8, 0)

    def describe(self) -> str:
        return f"{self.name} (sm_{self.capability[0]}{self.capability[1]}, cuda:{self.index})"


def _proc_cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and value.strip() and model in ("", platform.machine(),
                                                                                                   platform.processor()):
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags |= set(value.split())
    except OSError:  # not Linux: no feature list, the probe decides alone
        pass
    return model or "unknown CPU", flags


def cpu_info() -> CpuInfo:
    """This CPU's model, core count and speed-relevant features, capped by ``ONEDNN_MAX_CPU_ISA`` /
    ``ATEN_CPU_CAPABILITY`` when they are set (so an older CPU can be simulated)."""
    model, flags = _proc_cpuinfo()
    feats = {f for f in FEATURES if f in flags}
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in _ONEDNN_CAPS:
        feats &= _ONEDNN_CAPS[cap] | {"asimd", "asimddp", "sve"}
    aten = str(torch.backends.cpu.get_cpu_capability())
    if aten.upper() in ("DEFAULT", "AVX2"):  # ATEN_CPU_CAPABILITY=avx2 (or a real AVX2 CPU): no 512-bit vectors
        feats -= {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model, cores, tuple(f for f in FEATURES if f in feats), aten, onednn_bf16)


def gpu_info(device: torch.device) -> Optional[GpuInfo]:
    """The CUDA device ``device`` names, or None for a CPU device."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return GpuInfo(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)), index)


def describe_machine(device: torch.device | str = "cpu") -> str:
    """One line naming the hardware a number was measured on (benchmarks print it above every table)."""
    device = torch.device(device)
    gpu = gpu_info(device)
    cpu = cpu_info().describe()
    return f"{gpu.describe()}; host {cpu}" if gpu else cpu


# ----------------------------------------------------------------------------------------------- choices
@dataclass
class Choice:
    """One automatic decision: the value used and why."""

    value: Any
    reason: str


AMP_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def amp_name(dtype: Optional[torch.dtype]) -> str:
    return AMP_NAMES[dtype]


def cuda_amp(mode: str, gpu: GpuInfo) -> Choice:
    """Autocast dtype on a GPU: bf16 where tensor cores support it (sm_80+, no loss scaling needed),
    else fp16 with a GradScaler; ``off`` = fp32."""
    if mode == "off":
        return Choice(None, "amp: off (set by the user)")
    if gpu.bf16:
        return Choice(torch.bfloat16, f"bf16: {gpu.name} is sm_{gpu.capability[0]}{gpu.capability[1]} "
                                      "(bf16 tensor cores; no GradScaler needed)")
    return Choice(torch.float16, f"fp16 + GradScaler: {gpu.name} is sm_{gpu.capability[0]}{gpu.capability[1]} "
                                 "(no bf16 tensor cores before sm_80)")


@dataclass
class SpeedPlan:
    """Every automatic speed choice of one training run."""

    machine: str
    amp: Choice
    channels_last: Choice
    threads: Choice
    workers: Choice
    augment_device: Choice
    cudnn_benchmark: Choice
    openmp: Choice
    probe: dict[str, float] = field(default_factory=dict)  # variant -> measured s/step (empty: no probe)
    feature_engine: Optional[Choice] = None  # what ran the frozen backbone's cached feature pass (utils/deploy/engine.py)
    compile: Choice = field(default_factory=lambda: Choice(False, "not decided"))  # torch.compile of the model

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return self.amp.value

    @property
    def grad_scaler(self) -> bool:
        """fp16 needs loss scaling; bf16 has fp32's range and does not."""
        return self.amp.value == torch.float16

    def record(self) -> dict[str, Any]:
        """Plain dict for config.yaml and the checkpoint: each choice's value and reason."""
        out: dict[str, Any] = {"machine": self.machine}
        for name in ("amp", "channels_last", "compile", "threads", "workers", "augment_device", "cudnn_benchmark",
                     "openmp"):
            c = getattr(self, name)
            value = amp_name(c.value) if name == "amp" else c.value
            out[name] = {"value": value, "reason": c.reason}
        if self.feature_engine is not None:
            out["feature_engine"] = {"value": self.feature_engine.value, "reason": self.feature_engine.reason}
        if self.probe:
            out["probe_s_per_step"] = {k: round(v, 5) for k, v in self.probe.items()}
        return out

    def lines(self) -> list[str]:
        """The run header's 'speed choices' lines."""
        return [f"  {name}: {c['value']} - {c['reason']}" for name, c in self.record().items()
                if isinstance(c, dict) and "reason" in c]


def decide_threads(cpu: CpuInfo, local_world: int) -> Choice:
    """Intra-op threads: the cores this process may use, shared evenly between torchrun's local processes."""
    if "OMP_NUM_THREADS" in os.environ:
        return Choice(torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (set in the environment)")
    n = max(1, cpu.cores // max(1, local_world))
    why = f"{cpu.cores} cores" + (f" / {local_world} local processes" if local_world > 1 else "")
    return Choice(n, why)


def decide_openmp() -> Choice:
    """How idle OpenMP threads wait (set by utils.process before torch started; recorded here)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return Choice(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", "set in the environment")
    if "GOMP_SPINCOUNT" in os.environ:
        return Choice(f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}",
                      "short spin, then sleep: fast on a quiet machine, fair on a shared one (utils/process.py)")
    return Choice("libgomp default", "not set before torch started")


# Data-path rates that size the worker pool. Per worker: `benchmark.py data` measured 354 img/s decoding +
# augmenting 512 px JPEGs to 224 px on one AMD EPYC (Zen 5) core; half of it is assumed, for slower server cores
# and larger photos. GPU: a modern GPU trains MobileNetV2 at 224 px at roughly 2,000-3,000 img/s (estimate).
DISK_IMAGES_PER_WORKER = 180
GPU_TRAIN_IMAGES_PER_S = 2500


def decide_workers(requested: int, device: torch.device, cpu: CpuInfo, local_world: int = 1,
                   feature_pass: bool = False) -> Choice:
    """DataLoader worker processes per training process, for images decoded from disk (a RAM cache needs none).

    On a CPU: 1 worker (it decodes ~180 img/s, more than a CPU training step takes; a second would take a core
    from the step); for the one cached feature pass of a frozen backbone (``feature_pass``) on up to 2 cores
    none: decoding between batches keeps every core for the engine's threads (measured below). On a GPU: enough
    workers for the GPU's rate at ~180 img/s each, capped by this process's share of the cores less one for
    the training loop itself.
    """
    if requested >= 0:
        return Choice(requested, "set by the user or the recipe")
    if device.type == "cpu" and feature_pass and cpu.cores // max(1, local_world) <= 2:
        # benchmark.py features, 224 px, onnxruntime, 2 cores: quiet 181 img/s vs 155 (1 worker + 2 threads) and
        # 134 (1 + 1); with other jobs running 74 vs 59 and 82. A worker preempts one of the engine's threads.
        return Choice(0, "one feature pass on <= 2 cores: images decode in this process between batches, so "
                         "the engine's threads never wait for a preempted sibling (measured fastest)")
    if device.type == "cpu":
        return Choice(1, f"one decode worker (~{DISK_IMAGES_PER_WORKER} img/s) outruns a CPU training step; "
                         "more would take cores from it")
    share = max(1, cpu.cores // max(1, local_world) - 1)
    want = -(-GPU_TRAIN_IMAGES_PER_S // DISK_IMAGES_PER_WORKER)
    return Choice(min(want, share), f"the GPU trains ~{GPU_TRAIN_IMAGES_PER_S} img/s and one worker decodes "
                                    f"~{DISK_IMAGES_PER_WORKER}: {want} wanted, {share} cores free for this process")


def decide_augment_device(device: torch.device, cache: str, workers: int) -> Choice:
    """Where training images are augmented: on the GPU for a memory cache on CUDA, else in this process (memory
    cache, or no decode workers), else in the DataLoader workers that decode them."""
    if device.type == "cuda" and cache == "memory":
        return Choice("cuda", "batches cross to the GPU as uint8 and are augmented there (the CPU would starve it)")
    if cache == "memory":
        return Choice("cpu", "training on the CPU: augment in the main process, one thread")
    if workers == 0:
        return Choice("main process", "no decode workers: images are decoded and augmented here between steps")
    return Choice("workers", "images are decoded and augmented in DataLoader workers")


# ------------------------------------------------------------------------------------------------ probe
Variant = tuple  # (channels_last, autocast dtype), or with a third item: compiled (True) or not (False)
# Images per probe step = this / img_size**2 (41 at 224 px), at most the batch size: the real batch of every
# shipped CPU recipe. A smaller probe batch misleads: on a Zen 4 at 224 px, fp32 channels_last cost 31-36 ms per
# image at batch 10 (tied with bf16) but 64-68 ms at batch 32 (bf16: 28-34 and 33-35 ms), docs/speed.md.
PROBE_PIXELS = 2 ** 21
PROBE_STEPS = 3


def probe_batch(batch_size: int, img_size: int) -> int:
    """Images per probe step: the real batch unless it is very large in pixels (then fewer: seconds, not minutes)."""
    return max(2, min(batch_size, PROBE_PIXELS // (img_size * img_size)))


def cache_dir() -> str:
    """Where probe results are kept (``MOBILENET_CACHE_DIR``, else ``~/.cache/mobilenet``)."""
    return os.environ.get("MOBILENET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mobilenet")


def _probe_key(cpu: CpuInfo, what: dict[str, Any]) -> str:

    ident = {"cpu": asdict(cpu), "torch": torch.__version__, "torchvision": torchvision.__version__,
             "threads": torch.get_num_threads(), **what}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_cached(key: str) -> Optional[dict[str, float]]:
    try:
        with open(os.path.join(cache_dir(), "probe.json")) as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _store_cached(key: str, result: dict[str, float]) -> None:
    path = os.path.join(cache_dir(), "probe.json")
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table[key] = result
    try:
        write_json(path, table, indent=1)
    except OSError:  # read-only home: the probe simply runs again next time
        pass


def variant_name(v: Variant) -> str:
    name = f"{amp_name(v[1])} {'channels_last' if v[0] else 'NCHW'}"
    if len(v) > 2:  # the compile pair: always at the real batch (precision probes: see PROBE_PIXELS)
        return f"{'compiled' if v[2] else 'eager'} {name}"
    return name


def first_step_name(v: Variant) -> str:
    """Probe key of a variant's untimed first step (for a compiled variant: the compile time)."""
    return f"{variant_name(v)} (first step)"


def probe_variants(make_step: Callable[[Variant], Callable[[], None]], variants: list[Variant], cpu: CpuInfo,
                   what: dict[str, Any], use_cache: bool = True) -> tuple[dict[str, float], bool]:
    """Median seconds per training step of each variant, timed interleaved after one warm-up step each.

    ``make_step(variant)`` returns a function running one real step. Results are cached per CPU, library
    versions, thread count and ``what`` (model, image size, batch); returns (times, came_from_cache).
    """

    key = _probe_key(cpu, {**what, "variants": [variant_name(v) for v in variants]})
    if use_cache:
        cached = _load_cached(key)
        if cached and all(variant_name(v) in cached for v in variants):
            return cached, True
    steps = {variant_name(v): make_step(v) for v in variants}
    first: dict[str, float] = {}
    for v in variants:
        t0 = time.perf_counter()
        steps[variant_name(v)]()
        first[first_step_name(v)] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(PROBE_STEPS):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    result = {k: statistics.median(v) for k, v in times.items()}
    result.update({k: t for k, t in first.items() if k.startswith("compiled")})
    if use_cache:
        _store_cached(key, result)
    return result, False


def cpu_candidates(amp: str, channels_last: str, cpu: CpuInfo) -> tuple[list[Variant], list[str]]:
    """Variants worth probing on this CPU under the user's settings (in order of preference when times tie),
    plus notes on what was ruled out without measuring."""
    notes = []
    if amp == "on":
        dtypes: list[Optional[torch.dtype]] = [torch.bfloat16]
    elif amp == "off":
        dtypes = [None]
    elif cpu.onednn_bf16:
        dtypes = [None, torch.bfloat16]
    else:
        dtypes = [None]
        notes.append("bf16 ruled out without a probe: oneDNN has no bf16 kernels for this CPU (bf16 autocast would "
                     "run emulated, several times slower)")
    if channels_last != "auto":
        return [(channels_last == "on", dt) for dt in dtypes], notes
    # Both layouts in the first precision; bf16 only in NHWC, the layout its oneDNN kernels are made for.
    return [(True, dtypes[0]), (False, dtypes[0])] + [(True, dt) for dt in dtypes[1:]], notes


Probe = Callable[[list[Variant]], tuple[dict[str, float], bool]]  # variants -> (s per step by name, from cache)
FEATURES_ONLY = "only the linear head trains, on cached features"
TIE = 0.03  # variants within 3% of the fastest count as tied: the earlier candidate wins (stable across runs)


def decide_cpu_precision(amp: str, channels_last: str, cpu: CpuInfo, probe: Probe) -> tuple[Choice, Choice, dict]:
    """(amp, channels_last, probe times) for CPU training: the fastest measured variant the settings allow."""
    variants, notes = cpu_candidates(amp, channels_last, cpu)
    if len(variants) == 1:
        cl, dt = variants[0]
        amp_why = "set by the user" if amp != "auto" else notes[0]
        cl_why = "set by the user" if channels_last != "auto" else "the only candidate"
        return Choice(dt, amp_why), Choice(cl, cl_why), {}
    times, cached = probe(variants)
    fastest = min(times[variant_name(v)] for v in variants)
    best = next(v for v in variants if times[variant_name(v)] <= fastest * (1 + TIE))
    src = "cached probe" if cached else "probe"

    def versus(other: Variant) -> str:
        r = times[variant_name(other)] / times[variant_name(best)]
        return f"{variant_name(other)} {r:.2f}x the time per step in a {src}"

    dtypes = {v[1] for v in variants}
    if amp != "auto":
        amp_why = "set by the user"
    elif len(dtypes) == 1:
        amp_why = notes[0] if notes else "the only candidate"
    else:
        other = next(v for v in variants if v[1] != best[1])
        amp_why = versus(other)
        if best[1] is None and not cpu.native_bf16:
            amp_why = f"bf16 is emulated on this CPU ({amp_why})"
    if channels_last != "auto":
        cl_why = "set by the user"
    else:
        pair = [v for v in variants if v[0] != best[0] and v[1] == best[1]] or \
               [v for v in variants if v[0] != best[0]]
        cl_why = versus(pair[0])
    return Choice(best[1], amp_why), Choice(best[0], cl_why), times


def decide_cuda_layout(channels_last: str, amp: Optional[torch.dtype], gpu: GpuInfo) -> Choice:
    """channels_last on tensor-core GPUs (sm_70+) with fp16/bf16, where cuDNN's NHWC kernels are fastest."""
    if channels_last != "auto":
        return Choice(channels_last == "on", "set by the user")
    if amp is not None and gpu.capability >= (7, 0):
        return Choice(True, f"{amp_name(amp)} on tensor cores (sm_{gpu.capability[0]}{gpu.capability[1]}): NHWC kernels")
    return Choice(False, "fp32 or a GPU before tensor cores: cuDNN's NCHW kernels")


COMPILE_MIN_RUN_S = 20 * 60  # probing compile costs a compile (about a minute on 2 CPU cores): only long runs
COMPILE_MIN_GAIN = 0.05  # compiled steps must be at least this much faster to be worth a compile's risks


def _duration(seconds: float) -> str:
    """``8-minute`` or, under a minute, ``40-second`` (a short run is not a "0-minute" one)."""
    return f"{seconds / 60:.0f}-minute" if seconds >= 90 else f"{max(seconds, 1):.0f}-second"


def _run_length(run_s: Optional[float], step_s: Optional[float], run_steps: int) -> float:
    """Seconds the rest of the run will train: ``run_steps`` steps of ``step_s`` each, at most ``run_s`` (a time
    budget); whichever is known when only one is."""
    by_steps = step_s * run_steps if step_s is not None else None
    if run_s is None:
        return by_steps
    return run_s if by_steps is None else min(run_s, by_steps)


def decide_compile(mode: str, best: Variant, *, features_only: bool, run_steps: int,
                   est_step_s: Optional[float], probe: Optional[Probe],
                   batch_scale: float = 1.0, run_s: Optional[float] = None) -> tuple[Choice, dict[str, float]]:
    """torch.compile or not, and the probe times behind it.

    ``best`` is the eager variant already chosen, ``est_step_s`` its estimated seconds per real training step
    (None: unknown, probe it), ``run_steps`` the optimizer steps left in the run. A compile is probed only when
    the run is long enough to repay it; it is chosen when its measured steps are faster by more than
    ``COMPILE_MIN_GAIN`` and the time they save over the run exceeds twice the measured compile time (once for
    the probe, once for the run). ``probe`` runs at the real batch size when a compiled variant is among those
    asked for, else at a probe batch ``batch_scale`` times smaller. ``run_s``: the run's length in seconds when
    it is known in advance (a time budget); ``run_steps`` then is the most steps the budget may stretch to (its
    epoch cap), and the shorter of the two estimates counts: a 600-minute budget on a folder whose capped epochs
    take 5 minutes is a 5-minute run.
    """
    if mode != "auto":
        return Choice(mode == "on", "set by the user"), {}
    if features_only:
        return Choice(False, FEATURES_ONLY), {}
    if probe is None or run_steps <= 0:
        return Choice(False, "no probe on this path"), {}
    times: dict[str, float] = {}
    if est_step_s is None and run_s is None:
        times, _ = probe([best])
        est_step_s = times[variant_name(best)] * batch_scale
    est_run = _run_length(run_s, est_step_s, run_steps)
    if est_run < COMPILE_MIN_RUN_S:
        return Choice(False, f"not probed: compiling (a minute or more) would hardly pay back in an estimated "
                             f"{_duration(est_run)} run (compile: on forces it)"), times
    eager, compiled = (best[0], best[1], False), (best[0], best[1], True)
    try:
        measured, cached = probe([eager, compiled])
    except Exception as e:  # no C++ compiler, no Triton, an unsupported op: train eagerly and say why
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        return Choice(False, f"torch.compile failed in a probe ({type(e).__name__}: {msg})"), times
    times.update(measured)
    t_eager, t_comp = measured[variant_name(eager)], measured[variant_name(compiled)]
    compile_s = measured.get(first_step_name(compiled), 0.0)
    est_run = _run_length(run_s, t_eager, run_steps)
    saved = est_run * (1 - t_comp / t_eager)
    src = "cached probe" if cached else "probe"
    facts = (f"compiled steps {t_eager / t_comp:.2f}x as fast in a {src}; {saved / 60:.0f} of an estimated "
             f"{est_run / 60:.0f} minutes saved against {compile_s:.0f} s of compiling")
    if t_eager / t_comp >= 1 + COMPILE_MIN_GAIN and saved > 2 * compile_s:
        return Choice(True, facts), times
    return Choice(False, f"not worth it: {facts}"), times


def plan_training(*, device: torch.device, amp: str, channels_last: str, cache: str, workers: Choice,
                  threads: Choice, probe: Optional[Probe] = None, cpu: Optional[CpuInfo] = None,
                  gpu: Optional[GpuInfo] = None, compile: str = "off", run_steps: int = 0,
                  batch_scale: float = 1.0, images_per_step: int = 0, run_s: Optional[float] = None) -> SpeedPlan:
    """Every automatic speed choice for training on ``device`` with the data path ``cache`` actually used.

    ``probe`` times variants (see :func:`probe_variants`); ``cpu``/``gpu`` may be given to decide for
    another (simulated) machine; ``workers``/``threads`` come from :func:`decide_workers`/:func:`decide_threads`
    (made before the data loaders exist). For the compile decision: ``run_steps`` optimizer steps are left,
    ``batch_scale`` = real batch / probe batch of eager probes, ``images_per_step`` the real batch, ``run_s`` the
    training seconds left when a time budget fixes them.
    """
    cpu = cpu or cpu_info()
    gpu = gpu or gpu_info(device)
    features_only = cache == "features"
    if features_only:  # a linear layer on pooled features: nothing for bf16, fp16 or NHWC to speed up, no probe
        amp, channels_last = "off", "off"
    if gpu is not None:
        amp_c = cuda_amp(amp, gpu)
        cl_c = decide_cuda_layout(channels_last, amp_c.value, gpu)
        bench = Choice(True, "fixed input size: cuDNN picks the fastest convolution algorithm once")
        if torch.are_deterministic_algorithms_enabled():  # autotuning may pick another algorithm in every process
            bench = Choice(False, "deterministic algorithms requested (torch.use_deterministic_algorithms)")
        torch.backends.cudnn.benchmark = bool(bench.value)  # the compile probe below times what training runs
        times: dict[str, float] = {}
        machine = f"{gpu.describe()}; host {cpu.describe()}"
    else:
        if probe is None:
            raise ValueError("CPU training needs a probe to decide precision and layout")
        amp_c, cl_c, times = decide_cpu_precision(amp, channels_last, cpu, probe)
        bench = Choice(False, "no cuDNN on a CPU")
        machine = cpu.describe()
    if cache == "memory" and workers.value:
        workers = Choice(0, "images are cached in RAM and augmented in batches: no decode workers")
    if features_only:  # the user did not set them: say why they are off
        amp_c, cl_c = Choice(None, FEATURES_ONLY), Choice(False, FEATURES_ONLY)
    best = (bool(cl_c.value), amp_c.value)
    if gpu is not None:
        est = images_per_step / GPU_TRAIN_IMAGES_PER_S if images_per_step else None
    else:
        est = times[variant_name(best)] * batch_scale if variant_name(best) in times else None
    compile_c, compile_times = decide_compile(compile, best, features_only=features_only, run_steps=run_steps,
                                              est_step_s=est, probe=probe, batch_scale=batch_scale, run_s=run_s)
    return SpeedPlan(machine, amp_c, cl_c, threads, workers, decide_augment_device(device, cache, int(workers.value)), bench,
                     decide_openmp(), {**times, **compile_times}, compile=compile_c)


def apply_threads(threads: Choice) -> None:
    """Use ``threads`` intra-op threads (before any probe, so it measures what training will run)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(threads.value))


def apply_plan(plan: SpeedPlan, device: torch.device) -> None:
    """Set the process-wide switches a plan decides (cuDNN autotuning, the current CUDA device)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = bool(plan.cudnn_benchmark.value)


def decide_forward_threads(workers: int, budget: Optional[int] = None) -> Choice:
    """onnxruntime intra-op thread counts for a forward-only pass (utils/deploy/engine.py) beside ``workers`` DataLoader
    decode processes, out of ``budget`` threads (default: PyTorch's, i.e. this process's share of the cores).

    Without workers (train.py's choice for the feature pass on <= 2 cores) the engine gets them all. With decode
    workers on the same cores, ``budget`` and ``budget - workers`` threads are both candidates and the pass
    itself compares them (utils.deploy.engine.ThreadProbe): which wins depends on the load (2-core VM, 224 px, 1 worker,
    benchmark.py features: 2 threads 155 img/s vs 1 thread 134 when quiet, 59 vs 82 with other jobs running).
    """
    budget = budget or torch.get_num_threads()
    beside = max(1, budget - workers)
    if workers == 0 or beside == budget:
        return Choice((budget,), f"{budget} thread(s): {'no decode workers' if workers == 0 else 'one core'}")
    return Choice((budget, beside), f"{budget} or {beside} threads beside {workers} decode worker(s), "
                                    "whichever runs the pass's first batches faster")
