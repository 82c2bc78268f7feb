"""Open any model file (train.py checkpoint, TorchScript, ONNX, TensorRT engine, torch.export .pt2, ExecuTorch
.pte) behind one ``predict_batch``.

Every format carries its own class names and preprocessing (checkpoint entries, TorchScript
``_extra_files``, ONNX ``metadata_props``, the ``.engine.json`` sidecar of a TensorRT engine), so evaluation
and prediction never guess them::

    m = open_model("runs/fmnist/best.pt")            # or model.torchscript.pt / model.onnx
    tf = build_eval_transform(m.preprocess)
    logits = m.predict_batch(torch.stack([tf(img) for img in images]))
    names = [m.classes[i] for i in logits.argmax(1)]

A checkpoint on a CPU runs on onnxruntime when that computes the same logits faster (utils/deploy/engine.py, checked
on its first batch); ``m.engine`` says which runtime ran and why.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
import zipfile
from typing import Any, Callable

import torch

from utils.checkpoint import Preprocess, load_checkpoint, model_from_checkpoint, read_calibration
from utils.deploy import executorch_export as etx
from utils.deploy import tensorrt_engine as te
from utils.deploy.engine import fast_forward
from utils.deploy.onnx_io import onnx_session
from utils.deploy.tensorrt_engine import ENGINE_EXTENSIONS
from utils.errors import UserError
from utils.machine import Choice, cache_dir

ACCEPTED = ("a train.py checkpoint (.pt), a TorchScript file, an ONNX file (.onnx), a torch.export file (.pt2), "
            "an ExecuTorch program (.pte) or a TensorRT engine (.engine) written by export.py")


def inference_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else cuda when available, else cpu (UserError for a name that is no device)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None


def check_torch_device(dev: torch.device) -> None:
    """UserError unless PyTorch itself can run on ``dev``: a CUDA device with a CPU-only torch build, no driver or
    an index beyond the GPUs present. (ONNX files and TensorRT engines reach the GPU without torch's CUDA.)"""
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UserError(f"--device {dev}: this PyTorch ({torch.__version__}) sees no CUDA GPU (a CPU-only build, or "
                        "no NVIDIA driver); use --device cpu, or install a CUDA build of torch")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {dev}: only {torch.cuda.device_count()} CUDA GPU(s) here "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


class LoadedModel:
    """A model ready for inference, whatever file it came from.

    Attributes: ``path``, ``kind`` ("checkpoint" | "torchscript" | "onnx" | "engine" | "pt2" | "pte"), ``classes`` (list of
    names, index = logit position), ``preprocess`` (dict img_size/resize_size/mean/std), ``device``,
    ``arch`` (build args, checkpoints only, else None), ``config`` (training config, checkpoints only),
    ``threads`` (intra-op threads asked for in :func:`open_model`, else None), ``providers`` (ONNX only:
    the onnxruntime execution providers the session really uses, best first, else None) and ``engine``
    (which runtime ran the model and why, a utils.machine.Choice; a checkpoint's is chosen on its first batch).
    """

    def __init__(self, path: str, kind: str, classes: list[str], preprocess: dict[str, Any],
                 run: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 arch: dict | None = None, config: dict | None = None, threads: int | None = None,
                 providers: list[str] | None = None, engine: Choice | None = None,
                 calibration: dict[str, Any] | None = None) -> None:
        self.path = path
        # Temperature + reject threshold fitted on validation images (utils/trust/calibration.py), None if not fitted.
        self.calibration = calibration
        self.providers = providers
        self.threads = threads  # intra-op threads the caller asked for (None: runtime default)
        self.kind = kind
        self.classes = classes
        self.preprocess = preprocess
        self.device = device
        self.arch = arch
        self.config = config
        self._run = run
        self._engine = engine or Choice(kind, "")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def engine(self) -> Choice:
        """The runtime that ran (or will run) this model and why, e.g. ``onnxruntime`` for a checkpoint on a CPU."""
        return self._run.choice if isinstance(self._run, _FastCheckpoint) else self._engine

    def engine_line(self) -> str:
        """``engine: <runtime> - <why>`` for summaries (a checkpoint's engine is chosen on its first batch)."""
        reason = f" - {self.engine.reason}" if self.engine.reason else ""
        return f"engine: {self.engine.value}{reason}"

    def expect_images(self, n: int) -> None:
        """Say how many images the coming pass has: a checkpoint on a CPU exports itself to onnxruntime only when
        the pass is long enough to repay it (utils/deploy/engine.py). Other formats ignore it."""
        if isinstance(self._run, _FastCheckpoint):
            self._run.images = n

    def predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Float NCHW batch (already preprocessed) -> float32 logits (N, num_classes) on the CPU."""
        if x.ndim != 4:
            raise ValueError(f"predict_batch expects an NCHW batch, got shape {tuple(x.shape)}")
        return self._run(x).float().cpu()

    @property
    def runs_on(self) -> str:
        """Where inference runs, e.g. ``cpu`` or ``cuda:1 (TensorrtExecutionProvider)`` for an ONNX session."""
        return f"{self.device} ({self.providers[0]})" if self.providers else str(self.device)

    def describe(self) -> str:
        """One line for summaries, e.g. ``mobilenet_v2 checkpoint, 10 classes, 224 px, cpu``."""
        name = f"{self.arch['name']} " if self.arch else ""
        return (f"{name}{self.kind}, {self.num_classes} classes, {self.preprocess['img_size']} px "
                f"({'squash' if self.preprocess.get('resize_mode') == 'squash' else 'resize'} "
                f"{self.preprocess['resize_size']}), {self.runs_on}")

    def __repr__(self) -> str:
        return f"LoadedModel({self.path!r}, {self.describe()})"


def _validate_meta(path: str, classes: Any, preprocess: Any) -> tuple[list[str], dict[str, Any]]:
    """Check embedded class names and preprocessing; a clear error names the file and the fix."""
    fix = "re-export it with export.py (it embeds 'classes' and 'preprocess')"
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path} carries no class names (metadata 'classes' missing or not a list of names); {fix}")
    pre = Preprocess.from_dict(preprocess, path, fix).as_dict()
    return list(classes), pre


def _calibration(path: str, value: Any) -> dict[str, Any] | None:
    """The file's temperature/threshold entry (utils/trust/calibration.py), None when it has none."""
    return read_calibration(path, value)


def _parse_json(path: str, key: str, text: str | bytes | None) -> Any:
    if text in (None, "", b""):
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: metadata '{key}' is not valid JSON; re-export it with export.py") from None


def detect_kind(path: str) -> str:
    """Tell the format: checkpoint, torchscript, pt2, pte or onnx from the content; engine from the name (.engine/.plan).

    A TensorRT plan has no signature of its own (its layout changes between TensorRT versions), hence the name.
    """

    if not os.path.exists(path):
        raise UserError(f"model file {path} not found; pass {ACCEPTED}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass a model file inside it, e.g. {os.path.join(path, 'best.pt')}")
    if path.lower().endswith(ENGINE_EXTENSIONS):
        return "engine"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            names = []
        if etx.is_pt2(names):  # torch.export.save archive (utils/deploy/executorch_export.py)
            return "pt2"
        # TorchScript archives hold compiled code (<archive>/code/...); torch.save archives do not.
        return "torchscript" if any("/code/" in n for n in names) else "checkpoint"
    if etx.is_pte(path):
        return "pte"
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # legacy (non-zip) torch.save pickle
        return "checkpoint"
    return "onnx"


class _FastCheckpoint:
    """A checkpoint's network on the fastest engine of this machine (utils/deploy/engine.py: onnxruntime on a CPU when it
    matches PyTorch's logits, else PyTorch eager), chosen on the first batch it is given."""

    def __init__(self, model: torch.nn.Module, threads: int = 0) -> None:
        self.model, self.threads = model, threads
        self.images: int | None = None  # images in the coming pass (LoadedModel.expect_images); None: the first batch
        self._engine = None

    @property
    def choice(self) -> Choice:
        if self._engine is None:
            return Choice("pending", "chosen on the first batch")
        return self._engine.choice

    def __call__(self, x: torch.Tensor) -> torch.Tensor:

        if self._engine is None:
            # Same onnxruntime settings as an ONNX file gets in open_model: idle threads sleep (decode workers).
            # Without a hint the first batch is all that is known of the pass: a few images stay on PyTorch.
            images = self.images if self.images is not None else len(x)
            self._engine = fast_forward(self.model, x, images=images, threads=self.threads, same_top1=True)
            return self._engine.first
        return self._engine.run(x)


def _open_checkpoint(path: str, device: torch.device, threads: int | None = None) -> LoadedModel:

    ckpt = load_checkpoint(path)
    classes, pre = _validate_meta(path, ckpt.get("classes"), ckpt.get("preprocess"))
    model = model_from_checkpoint(ckpt).to(device).to(memory_format=torch.channels_last)
    if len(classes) != model.arch["num_classes"]:
        raise UserError(f"{path}: {len(classes)} class names but the model has {model.arch['num_classes']} outputs; "
                        "the checkpoint is inconsistent, re-save it with train.py")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    return LoadedModel(path, "checkpoint", classes, pre, _FastCheckpoint(model.eval(), threads or 0), device,
                       arch=dict(model.arch), config=config, calibration=_calibration(path, ckpt.get("calibration")))


def _optimize_torchscript(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Freeze (weights become constants, conv+BN folded) and apply inference passes (oneDNN on CPU).

    Measured on MobileNetV2 32 px, 1 thread: 2.6x the images/s of the plain loaded module, logits within
    3e-5. A module the passes cannot handle is used as loaded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.optimize_for_inference(torch.jit.freeze(module))
    except Exception:
        return module


def _open_torchscript(path: str, device: torch.device) -> LoadedModel:
    extra = {"classes": "", "preprocess": "", "calibration": ""}
    try:
        with warnings.catch_warnings():  # torch>=2.9 flags jit.load as deprecated; the format still works
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location=device, _extra_files=extra)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read TorchScript file {path} ({first}); pass {ACCEPTED}") from None
    classes, pre = _validate_meta(path, _parse_json(path, "classes", extra["classes"]),
                                  _parse_json(path, "preprocess", extra["preprocess"]))
    module = _optimize_torchscript(module.eval())

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.to(device, non_blocking=True))

    return LoadedModel(path, "torchscript", classes, pre, run, device,
                       engine=Choice("torchscript", "a TorchScript file runs on PyTorch's TorchScript runtime"),
                       calibration=_calibration(path, extra["calibration"]))


def _ort_tensorrt_cache() -> str:
    """Folder for onnxruntime's TensorRT engine cache (building an engine takes minutes on a Jetson):
    ``ort-tensorrt`` in :func:`utils.machine.cache_dir`."""

    path = os.path.join(cache_dir(), "ort-tensorrt")
    os.makedirs(path, exist_ok=True)
    return path


def onnx_providers(device: torch.device, available: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Execution providers to ask for, best first: TensorRT, then CUDA (both on ``device``'s GPU), then CPU.

    The TensorRT provider stays fp32 like the ONNX file (the fp16 path is export.py's verified ``.engine``)
    and caches its engines, so only the first session pays the build.
    """
    if device.type != "cuda":
        return [("CPUExecutionProvider", {})]
    gpu = {"device_id": device.index or 0}
    chosen: list[tuple[str, dict[str, Any]]] = []
    if "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", {**gpu, "trt_fp16_enable": False, "trt_engine_cache_enable": True,
                                                     "trt_engine_cache_path": _ort_tensorrt_cache()}))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", dict(gpu)))
    return chosen + [("CPUExecutionProvider", {})]


def _report_provider_fallback(path: str, device: torch.device, asked: list[str], got: list[str],
                              available: list[str]) -> None:
    """One warning line on stderr when the session does not run on the best provider asked for."""
    if device.type == "cuda" and asked == ["CPUExecutionProvider"]:
        print(f"warning: --device {device} asked, but this onnxruntime has no CUDA or TensorRT provider "
              f"(available: {', '.join(available)}); running {path} on the CPU (install onnxruntime-gpu, or "
              "NVIDIA's onnxruntime wheel for JetPack)", file=sys.stderr)
    elif got[:1] != asked[:1]:
        missing = [p for p in asked if p not in got]
        print(f"warning: onnxruntime did not start {', '.join(missing)} for {path}; running on "
              f"{got[0] if got else 'nothing'}", file=sys.stderr)


def _open_onnx(path: str, device: torch.device, threads: int | None = None) -> LoadedModel:
    import onnxruntime as ort  # noqa: PLC0415  (lazy: optional/heavy dependency)

    available = list(ort.get_available_providers())
    providers = onnx_providers(device, available)
    try:
        sess = onnx_session(path, threads or 0, spinning=False, providers=providers)
    except Exception as e:
        # Not a zip archive, so not a checkpoint/TorchScript; the ONNX parser's detail only helps for .onnx files.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = f" ({first[:160]})" if path.lower().endswith(".onnx") else ""
        raise UserError(f"cannot read model file {path}: it is not a valid checkpoint, TorchScript or ONNX file "
                        f"(corrupt or truncated?){detail}; pass {ACCEPTED}") from None
    meta = sess.get_modelmeta().custom_metadata_map
    classes, pre = _validate_meta(path, _parse_json(path, "classes", meta.get("classes")),
                                  _parse_json(path, "preprocess", meta.get("preprocess")))
    inputs = sess.get_inputs()
    in_name = "input" if any(i.name == "input" for i in inputs) else inputs[0].name
    out_name = sess.get_outputs()[0].name
    got = list(sess.get_providers())
    _report_provider_fallback(path, device, [name for name, _ in providers], got, available)
    # The session runs on CPU arrays; when it uses a GPU, onnxruntime copies in and out itself.
    gpu = got[:1] in (["TensorrtExecutionProvider"], ["CUDAExecutionProvider"])
    used = torch.device("cuda", device.index or 0) if gpu else torch.device("cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(sess.run([out_name], {in_name: arr})[0])

    return LoadedModel(path, "onnx", classes, pre, run, used, providers=got,
                       engine=Choice("onnxruntime", f"an ONNX file runs on onnxruntime ({got[0]})"),
                       calibration=_calibration(path, meta.get("calibration")))


def _open_engine(path: str, device: str | torch.device | None) -> LoadedModel:
    """A TensorRT engine with its sidecar (classes, preprocessing); runs on a CUDA GPU only."""

    plan, meta = te.read_engine(path)
    classes, pre = _validate_meta(te.sidecar_path(path), meta.get("classes"), meta.get("preprocess"))
    runner, used = te.open_engine(path, meta, plan, device)
    return LoadedModel(path, "engine", classes, pre, runner, used,
                       engine=Choice("tensorrt", "a TensorRT engine runs on TensorRT"),
                       calibration=_calibration(path, meta.get("calibration")))


def _open_exported(path: str, kind: str) -> LoadedModel:
    """A torch.export archive (.pt2, runs on PyTorch) or an ExecuTorch program (.pte, runs on ExecuTorch's
    runtime with XNNPACK), CPU only; see utils/deploy/executorch_export.py."""

    if kind == "pte":
        meta, run = etx.open_pte(path)
        engine = Choice("executorch", "an ExecuTorch program runs on ExecuTorch's runtime (XNNPACK)")
    else:
        meta, run = etx.open_pt2(path)
        engine = Choice("torch.export", "a .pt2 file runs its exported graph on PyTorch")
    classes, pre = _validate_meta(path, _parse_json(path, "classes", meta["classes"]),
                                  _parse_json(path, "preprocess", meta["preprocess"]))
    return LoadedModel(path, kind, classes, pre, run, torch.device("cpu"), engine=engine,
                       calibration=_calibration(path, meta.get("calibration")))


def open_model(path: str, device: str | torch.device | None = None, threads: int | None = None) -> LoadedModel:
    """Load a checkpoint, TorchScript, ONNX, TensorRT engine, .pt2 or .pte file as a :class:`LoadedModel`.

    ``threads`` sets the intra-op threads (onnxruntime sessions, a checkpoint's included; for PyTorch this is
    process-wide ``torch.set_num_threads``); None keeps each runtime's default. Unknown or corrupt files raise
    :class:`UserError` naming the file and the accepted formats.
    """
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    dev = inference_device(device)
    kind = detect_kind(path)
    if kind == "engine":  # GPU only: its default is cuda:0 even when torch itself has no CUDA (Jetson)
        model = _open_engine(path, device)
    elif kind == "onnx":
        model = _open_onnx(path, dev, threads)
    elif kind in ("pt2", "pte"):
        model = _open_exported(path, kind)
        if device is not None and dev.type != "cpu":
            print(f"warning: --device {device} asked, but a .{kind} file runs on the CPU only; running {path} on the "
                  "CPU (for a GPU: the checkpoint, model.onnx or a TensorRT engine)", file=sys.stderr)
        if threads and kind == "pt2":  # a .pte keeps ExecuTorch's own thread pool (resetting it hung here)
            torch.set_num_threads(threads)
    else:
        if threads:
            torch.set_num_threads(threads)
        check_torch_device(dev)
        model = _open_checkpoint(path, dev, threads) if kind == "checkpoint" else _open_torchscript(path, dev)
    model.threads = threads
    return model
