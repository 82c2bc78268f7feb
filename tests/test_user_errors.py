"""The mistakes users make most, through the real command lines: each is one clear `error:` line, exit 2,
no traceback, and the message names the file and what to do."""
import os
import shutil

import pytest
from cli_helpers import run_together
from eval_helpers import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
PHOTOS = os.path.join(ROOT, "tests", "assets", "photos")


def fails_together(*commands):
    """Run scripts expecting a user error, all at once; return each one's single error line, in order."""
    lines = []
    for p in run_together(commands, timeout=300):
        assert p.returncode == 2, f"{p.args[1:]}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        assert "Traceback" not in p.stderr
        errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, p.stderr
        lines.append(errors[0])
    return lines


def fails(*args):
    """Run a script expecting a user error; return its single error line."""
    return fails_together(args)[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    classes = sorted(os.listdir(SAMPLE))
    return make_checkpoint(str(tmp_path_factory.mktemp("ck") / "best.pt"), classes)


def test_wrong_paths(tmp_path):
    train_msg, split_msg, export_msg = fails_together(
        ("train.py", "--data", str(tmp_path / "nope")),
        ("split_dataset.py", str(tmp_path / "nope"), str(tmp_path / "out")),
        ("export.py", str(tmp_path / "nope.pt")))
    assert train_msg == (f"error: data folder {tmp_path / 'nope'} not found; pass --data DIR with train/ and val/ "
                         "class folders (make one with split_dataset.py)")
    assert f"{tmp_path / 'nope'} is not a folder" in split_msg
    assert export_msg == (f"error: checkpoint {tmp_path / 'nope.pt'} not found; pass a .pt file written by train.py "
                          "(e.g. RUN/best.pt)")


def test_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    split_msg, train_msg = fails_together(("split_dataset.py", str(tmp_path / "empty"), str(tmp_path / "out")),
                                          ("train.py", "--data", str(tmp_path / "empty")))
    assert "found 0 class folder(s) with usable images; a classifier needs at least 2" in split_msg
    assert f"{tmp_path / 'empty' / 'train'} not found" in train_msg and "split_dataset.py" in train_msg
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_raw_folder_given_to_train(tmp_path):
    # The classic mix-up: the raw class folders instead of the split.
    msg = fails("train.py", "--data", SAMPLE)
    assert "must hold train/ and val/ folders" in msg and "split_dataset.py RAW OUT" in msg


def test_wrong_model_file(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"\x00not a model")
    image_as_model = os.path.join(PHOTOS, "ibex.jpg")
    *junk_msgs, image_msg = fails_together(("evaluate.py", str(junk), PHOTOS), ("predict.py", str(junk), PHOTOS),
                                           ("predict.py", image_as_model, PHOTOS))
    for msg in junk_msgs:
        assert f"cannot read model file {junk}" in msg and "pass a train.py checkpoint" in msg
    assert "cannot read model file" in image_msg


def test_predict_output_file_that_is_a_folder(ckpt, tmp_path):
    """`--csv DIR` predicted everything, then died in the atomic rename; now one line before any work."""
    csv_msg, json_msg = fails_together(("predict.py", ckpt, PHOTOS, "--csv", str(tmp_path)),
                                       ("predict.py", ckpt, PHOTOS, "--json", str(tmp_path)))
    assert csv_msg == f"error: --csv {tmp_path} is a folder; pass a file name, e.g. {tmp_path}/preds.csv"
    assert json_msg == f"error: --json {tmp_path} is a folder; pass a file name, e.g. {tmp_path}/preds.json"
    assert os.listdir(tmp_path) == []


def test_wrong_weights_for_architecture(tmp_path):
    from models.pretrained import resolve_imagenet_weights

    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("Bag", "Coat"):
            os.makedirs(data / split / cls)
            for f in sorted(os.listdir(os.path.join(SAMPLE, cls)))[:4]:
                shutil.copy(os.path.join(SAMPLE, cls, f), data / split / cls / f)
    v2_file = resolve_imagenet_weights("mobilenet_v2")
    msg = fails("train.py", "--data", str(data), "--model", "mobilenet_v3_small", "--pretrained", v2_file,
                "--epochs", "1", "--img-size", "32", "--out", str(tmp_path / "run"), "--set", "progress=false")
    assert f"weights file {v2_file} does not fit mobilenet_v3_small" in msg and "--model/--width-mult" in msg


def test_bad_config_values():
    assert fails_together(("train.py", "--set", "foo=1"), ("train.py", "--set", "lr=abc")) == [
        "error: --set: unknown config key(s) foo; valid keys are listed by `python train.py --help`",
        "error: --set: 'lr' must be float, got 'abc' (str)"]


def test_classes_that_differ(tmp_path, ckpt):
    data = tmp_path / "val"
    for cls in ("Bag", "Coat", "Parka"):
        os.makedirs(data / cls)
        src = os.path.join(SAMPLE, "Coat")
        for f in sorted(os.listdir(src))[:2]:
            shutil.copy(os.path.join(src, f), data / cls / f)
    msg = fails("evaluate.py", ckpt, str(data), "--workers", "0", "--no-progress")
    assert "Parka" in msg and "class" in msg


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_or_a_device_that_is_no_device(ckpt, tmp_path):
    """evaluate/predict with --device cuda where torch sees no GPU (a CPU-only build, a Jetson's own torch): one
    line, not torch's "Torch not compiled with CUDA enabled" traceback from inside the first batch."""
    import torch

    photo = os.path.join(PHOTOS, "ibex.jpg")
    cuda, name = fails_together(("predict.py", ckpt, photo, "--device", "cuda"),
                                ("evaluate.py", ckpt, SAMPLE, "--device", "gpu"))
    assert cuda == (f"error: --device cuda: this PyTorch ({torch.__version__}) sees no CUDA GPU (a CPU-only build, "
                    "or no NVIDIA driver); use --device cpu, or install a CUDA build of torch")
    assert name == "error: --device gpu: not a device name; use cpu, cuda or cuda:N"
