"""datasets/fashion_mnist/prepare.py: real Fashion-MNIST -> class folders of PNGs; atomic, idempotent, clear offline."""
import os

import numpy as np
import pytest
from PIL import Image

import datasets.fashion_mnist.prepare as prep
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
HAVE_DEBIAN = os.path.isfile(os.path.join(prep.DEBIAN_DIR, "train-images-idx3-ubyte.gz"))


@pytest.fixture(scope="module")
def arrays():
    if not HAVE_DEBIAN:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    return prep.load_arrays()


def test_real_files_and_committed_sample_agree(arrays):
    images, labels = arrays["train"]
    assert images.shape == (60000, 28, 28) and arrays["test"][0].shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10
    assert np.bincount(arrays["test"][1]).tolist() == [1000] * 10
    assert sorted(os.listdir(SAMPLE)) == sorted(prep.CLASSES)
    for cls in prep.CLASSES:
        files = sorted(os.listdir(os.path.join(SAMPLE, cls)))
        assert len(files) == 20
        for f in files[:3]:
            i = int(f[len("train_"):-len(".png")])
            assert labels[i] == prep.CLASSES.index(cls)
            assert np.array_equal(np.asarray(Image.open(os.path.join(SAMPLE, cls, f))), images[i])


def test_prepare_is_atomic_and_idempotent(arrays, tmp_path, monkeypatch):
    # a 3-per-class real subset stands in for the 70,000 images to keep the test fast
    small = {}
    for part, per_class in (("train", 2), ("test", 1)):
        images, labels = arrays[part]
        idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
        small[part] = (images[idx], labels[idx])
    monkeypatch.setattr(prep, "TOTAL", 30)
    monkeypatch.setattr(prep, "load_arrays", lambda src: small)
    out = tmp_path / "raw"

    real_save = Image.Image.save
    calls = {"n": 0}

    def crash_save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real_save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", crash_save)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_fashion_mnist(str(out))
    assert os.listdir(tmp_path) == []  # no half-written folder, no temp left behind
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert prep.prepare_fashion_mnist(str(out)) == str(out)
    assert sorted(os.listdir(out)) == sorted(prep.CLASSES)
    # names keep the position in the source arrays (here the subset: Bag = class 8 at train 16, 17 and test 8)
    assert sorted(os.listdir(out / "Bag")) == ["test_00008.png", "train_00016.png", "train_00017.png"]
    assert np.array_equal(np.asarray(Image.open(out / "Bag" / "train_00017.png")), small["train"][0][17])
    monkeypatch.setattr(prep, "load_arrays", lambda src: (_ for _ in ()).throw(AssertionError("reloaded")))
    assert prep.prepare_fashion_mnist(str(out)) == str(out)  # complete: nothing redone
    os.remove(out / "Bag" / os.listdir(out / "Bag")[0])
    with pytest.raises(UserError, match="not a complete Fashion-MNIST folder; delete it"):
        prep.prepare_fashion_mnist(str(out))


def test_default_dataset_without_progress_bars(arrays, tmp_path, monkeypatch, capfd):
    """train.py --no-progress on first use prepares the default data without a bar (three used to print), and the
    folders it builds under private temporary names end with the umask's permissions, not 0700."""
    small = {part: (arrays[part][0][:40], arrays[part][1][:40]) for part in ("train", "test")}
    monkeypatch.setattr(prep, "TOTAL", 80)
    monkeypatch.setattr(prep, "load_arrays", lambda src: small)
    old = os.umask(0o022)
    try:
        split = prep.ensure_default_dataset(str(tmp_path / "fm"), progress=False)
    finally:
        os.umask(old)
    err = capfd.readouterr().err
    assert "fashion-mnist -> png" not in err and "checking images" not in err and "hardlink ->" not in err, err
    assert os.path.isdir(os.path.join(split, "train", "Bag")) and os.path.isdir(os.path.join(split, "val"))
    for folder in (tmp_path / "fm" / "raw", tmp_path / "fm" / "split"):
        assert oct(os.stat(folder).st_mode & 0o777) == oct(0o755), folder


def test_offline_without_debian_files_fails_clearly(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        prep.prepare_fashion_mnist(str(tmp_path / "raw"), src=str(tmp_path / "missing"))
    assert not (tmp_path / "raw").exists()
