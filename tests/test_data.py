"""utils.data: transforms, checked folders, exact reproducible order (workers, resume, DDP), caches, corrupt files."""
import io
import os
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from utils.bench.data import v1_train_transform
from utils.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    augment_batch,
    build_eval_transform,
    build_train_transform,
    is_image_file,
    load_data,
    load_image_folder,
    sample_seeds,
)
from utils.data.split import split_dataset
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
PHOTOS = os.path.join(ROOT, "tests", "assets", "photos")
AUG = {"color_jitter": 0.4, "rotation": 10.0, "random_erasing": 0.5}


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    """The committed real Fashion-MNIST sample split 150 train / 50 val."""
    out = tmp_path_factory.mktemp("fm") / "split"
    split_dataset(SAMPLE, str(out), val=0.25, seed=0)
    return str(out)


def _load(data_dir, **kw):
    args = dict(img_size=32, resize_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=8, workers=0,
                augment=AUG, cache="none", seed=7, progress=False)
    args.update(kw)
    return load_data(data_dir, **args)


def _epoch(bundle, epoch):
    bundle.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in bundle.train_loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("size", [28, 64, 224])
def test_transforms_any_mode_any_size(size):
    photo = Image.open(os.path.join(PHOTOS, "goldfish.jpg"))
    for img in (photo, photo.convert("L"), photo.convert("CMYK"), photo.convert("P"), photo.convert("RGBA")):
        for backend in ("pil", "tensor", "v1") if img.mode == "RGB" else ("pil",):
            make = v1_train_transform if backend == "v1" else partial(build_train_transform, backend=backend)
            tf = make(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, auto_augment="trivial", random_erasing=0.5,
                      color_jitter=0.4, rotation=15)
            torch.manual_seed(0)
            x = tf(img)
            torch.manual_seed(0)
            assert x.shape == (3, size, size) and x.dtype == torch.float32 and torch.equal(x, tf(img))
        ev = build_eval_transform({"img_size": size, "resize_size": size * 8 // 7, "mean": IMAGENET_MEAN,
                                   "std": IMAGENET_STD})(img)
        assert ev.shape == (3, size, size)
    with pytest.raises(UserError, match="auto_augment"):
        build_train_transform(32, mean=IMAGENET_MEAN, std=IMAGENET_STD, auto_augment="rand")


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'} does not exist"):
        load_image_folder(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        load_image_folder(str(tmp_path / "file.txt"))
    empty = tmp_path / "empty"
    (empty / ".ipynb_checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no class sub-folders"):
        load_image_folder(str(empty))
    (empty / "a").mkdir()
    (empty / "b").mkdir()
    (empty / "a" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        load_image_folder(str(empty))
    one = tmp_path / "one"
    shutil.copytree(os.path.join(SAMPLE, "Bag"), one / "Bag")
    with pytest.raises(UserError, match="at least 2 classes"):
        load_image_folder(str(one))
    shutil.copytree(os.path.join(SAMPLE, "Coat"), one / "Coat")
    (one / ".hidden").mkdir()
    (one / "Coat" / "._x.png").write_bytes(b"junk")
    ds = load_image_folder(str(one))
    assert ds.classes == ["Bag", "Coat"] and len(ds.samples) == 40 and ds.targets.count(1) == 20


def test_load_data_checks(fm, tmp_path):
    with pytest.raises(UserError, match="unknown augment option.*colour_jitter"):
        _load(fm, augment={"colour_jitter": 0.4})
    no_val = tmp_path / "no_val"
    shutil.copytree(os.path.join(fm, "train"), no_val / "train")
    with pytest.raises(UserError, match=f"{no_val / 'val'} not found; .* must hold train/ and val/"):
        _load(str(no_val))
    bad = tmp_path / "bad"
    shutil.copytree(fm, bad)
    shutil.rmtree(bad / "val" / "Bag")
    shutil.copytree(bad / "val" / "Coat", bad / "val" / "Jacket")
    with pytest.raises(UserError) as e:
        _load(str(bad))
    assert str(e.value) == (f"{bad}: val/ has class folders that train/ lacks (Jacket); the model learns only classes "
                            "with training images: move some of their images to train/, or re-split with "
                            "split_dataset.py")
    # val/ without a class (split_dataset keeps a tiny class in train only; git or zip drops the empty folder):
    # accepted, val labelled with train's class indices, in the loaders and in the cached-feature pass
    shutil.rmtree(bad / "val" / "Jacket")
    from utils.data import load_split
    from utils.train_loop import cache_pooled_features
    train_ds, val_ds = load_split(str(bad))
    assert "Bag" in train_ds.classes and val_ds.classes == train_ds.classes and len(val_ds.samples) == 45
    assert all(os.path.basename(os.path.dirname(p)) == train_ds.classes[y] for p, y in val_ds.samples)
    b = _load(str(bad), cache="memory")
    assert b.classes == train_ds.classes and sorted(set(torch.cat([y for _, y in b.val_loader]).tolist())) == \
        sorted(set(val_ds.targets))
    from models import build_model
    net = build_model("mobilenet_v2", num_classes=10, width_mult=0.25)
    feats = cache_pooled_features(net, str(bad), {"img_size": 32, "resize_size": 32, "mean": IMAGENET_MEAN,
                                                  "std": IMAGENET_STD}, 16, 0, torch.device("cpu"), 0, 0, 1)
    assert torch.cat([y for _, y in feats.val_loader]).tolist() == val_ds.targets
    for c in [c for c in os.listdir(bad / "val") if c != "Coat"]:  # val/ down to one class: still a val split
        shutil.rmtree(bad / "val" / c)
    train_ds, val_ds = load_split(str(bad))
    assert set(val_ds.targets) == {train_ds.class_to_idx["Coat"]}
    # train.py names the classes val/ cannot measure, once per phase, and records them
    import train
    missing = train.val_missing_classes(str(bad), train_ds.classes)
    assert missing == [c for c in train_ds.classes if c != "Coat"] and len(missing) == 9
    assert train.val_missing_line(["Bag"], 10) == (
        "  val/ has no images of Bag: its recall is not measured; balanced accuracy, macro-F1 and the choice of "
        "best.pt use the other 9 classes (move some of its images to val/, or re-split with split_dataset.py)")
    assert train.val_missing_line(["Bag", "Shirt"], 10).startswith("  val/ has no images of Bag, Shirt: their recall")


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_epoch_is_pure_function_of_seed_and_epoch(fm, cache):
    b = _load(fm, cache=cache)
    assert b.cache == cache and (b.num_train, b.num_val) == (150, 50) and len(b.classes) == 10
    e0, e1 = _epoch(b, 0), _epoch(b, 1)
    # 18 full batches plus the last 6 images (kept: small folders must not lose images every epoch).
    assert [len(y) for _, y in e0] == [8] * 18 + [6]
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in e0)
    assert not torch.equal(e0[0][0], e1[0][0])
    resumed = _load(fm, cache=cache)  # a new process resuming at epoch 1
    assert _same(_epoch(resumed, 1), e1)
    assert _same(_epoch(b, 0), e0)
    if cache == "none":
        with_workers = _load(fm, cache=cache, workers=2)
        assert _same(_epoch(with_workers, 1), e1)
    other_seed = _load(fm, cache=cache, seed=8)
    assert not torch.equal(_epoch(other_seed, 1)[0][0], e1[0][0])


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_two_ranks_union_equals_one_process_double_batch(fm, cache, monkeypatch):
    one = _epoch(_load(fm, cache=cache, batch_size=8), 3)
    ranks = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ranks.append(_epoch(_load(fm, cache=cache, batch_size=4, distributed=True), 3))
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        # rank r holds positions r, r+2, ... of the global batch
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
    # val: each rank gets its shard, together every image exactly once
    val_ranks = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        b = _load(fm, cache=cache, batch_size=4, distributed=True)
        val_ranks.append(torch.cat([y for _, y in b.val_loader]))
    assert len(val_ranks[0]) + len(val_ranks[1]) == 50


def test_memory_cache_matches_eval_transform_and_augments_per_image(fm):
    mem, disk = _load(fm, cache="memory", resize_size=36), _load(fm, cache="none", resize_size=36)
    assert _load(fm, cache="auto").cache == "memory"
    vm, vd = list(mem.val_loader), list(disk.val_loader)
    assert _same(vm, vd)  # identical val tensors: decode once == decode every time
    ds = load_image_folder(os.path.join(fm, "val"))
    tf = build_eval_transform({"img_size": 32, "resize_size": 36, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    assert torch.equal(vm[0][0][3], tf(Image.open(ds.samples[3][0])))
    # an image's augmentation does not depend on which batch it is in
    x = mem.train_loader.images[:6]
    seeds = sample_seeds(0, 5, np.arange(6))
    cfg = AugmentConfig.from_dict({**AUG, "auto_augment": "trivial"})
    full = augment_batch(x, seeds, 32, cfg, IMAGENET_MEAN, IMAGENET_STD)
    part = augment_batch(x[[4, 1]], seeds[[4, 1]], 32, cfg, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(full[[4, 1]], part)
    # with a full-image crop the grid sample is exact: identity, and a mirror image with hflip=1
    ident = AugmentConfig(scale=(1.0, 1.0), hflip=0.0)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    ref = (x.float().expand(-1, 3, -1, -1) / 255 - mean) / std
    assert torch.allclose(augment_batch(x, seeds, 28, ident, IMAGENET_MEAN, IMAGENET_STD), ref, atol=1e-5)
    flipped = augment_batch(x, seeds, 28, AugmentConfig(scale=(1.0, 1.0), hflip=1.0), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(flipped, ref.flip(-1), atol=1e-5)
    # crops: random sizes and positions, flips about half the time
    cfg = AugmentConfig()
    seeds = sample_seeds(1, 0, np.arange(400))
    xx = x[:1].expand(400, -1, -1, -1)
    out = augment_batch(xx, seeds, 28, cfg, IMAGENET_MEAN, IMAGENET_STD)
    n_ident = sum(torch.allclose(o, ref[0], atol=1e-5) for o in out)
    assert n_ident < 10 and len({round(float(o.sum()), 2) for o in out}) > 300


def test_modes_and_sizes_become_rgb(tmp_path):
    raw = tmp_path / "raw"
    for cls, mode in (("cmyk", "CMYK"), ("palette", "P"), ("rgba", "RGBA"), ("grey", "L")):
        (raw / cls).mkdir(parents=True)
        for i, name in enumerate(sorted(os.listdir(PHOTOS))[:4]):
            if name.endswith(".jpg"):
                im = Image.open(os.path.join(PHOTOS, name)).convert(mode)
                im.save(raw / cls / f"{i}.{'jpg' if mode in ('CMYK', 'L') else 'png'}")
    data = tmp_path / "data"
    split_dataset(str(raw), str(data), val=0.25)
    # 256 px photos for 48 px training: auto decodes per step (the batched crop does not antialias 5x shrinks)
    assert _load(str(data), cache="auto", img_size=48, resize_size=56).cache == "none"
    for cache in ("none", "memory"):
        b = _load(str(data), cache=cache, img_size=48, resize_size=56, batch_size=3)
        x, y = next(iter(b.train_loader))
        assert x.shape == (3, 3, 48, 48)
        xv, _ = next(iter(b.val_loader))
        assert xv.shape[1:] == (3, 48, 48)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale scan (PNG or TIFF, PIL mode I;16) reads as the 8-bit image it holds in every decoder;
    PIL's convert("RGB") clips it to 255, so a whole inspection folder would train on white squares."""
    from utils.data import ImageFiles, decode_rgb, load_pil_rgb
    from utils.data.loaders import _decode_one

    grey = np.asarray(Image.open(os.path.join(PHOTOS, "ibex.jpg")).convert("L"), dtype=np.uint16)
    assert grey.std() > 20  # a real photo, not a flat field
    wide = Image.fromarray(grey * 257)  # I;16: 0..255 -> 0..65535, as a 16-bit sensor writes it
    paths = [str(tmp_path / "scan.png"), str(tmp_path / "scan.tif")]
    for p in paths:
        wide.save(p)
        assert Image.open(p).mode.startswith("I")
    want = torch.from_numpy(grey.astype(np.uint8))
    tf = build_eval_transform({"img_size": 64, "resize_size": 64, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    want_x = tf(Image.fromarray(grey.astype(np.uint8)))
    for p in paths:
        for rgb in (decode_rgb(p), torch.from_numpy(np.array(load_pil_rgb(p))).permute(2, 0, 1)):
            assert rgb.shape[0] == 3 and rgb.dtype == torch.uint8
            assert (rgb.int() - want.int()).abs().max() <= 1, p
        assert torch.equal(_decode_one(p)[0], want)  # the memory cache keeps it 1-channel
        x, _, err = ImageFiles([p], tf)[0]  # evaluate/predict/export: PIL straight into the transform
        assert err is None and (x - want_x).abs().max() < 0.05  # 1/255 in ImageNet std units is ~0.018


def test_phone_photo_is_turned_upright_by_its_exif_tag_in_every_decoder(tmp_path):
    """A portrait phone photo is stored sideways with EXIF orientation 6; training (both decoders and the memory
    cache), evaluate/predict/export (PIL) all see it upright, as a photo viewer shows it."""
    from utils.data import ImageFiles, decode_rgb, load_pil_rgb
    from utils.data.loaders import _decode_one

    upright = Image.open(os.path.join(PHOTOS, "ibex.jpg")).convert("RGB")
    upright = upright.crop((0, 0, upright.width, upright.height * 2 // 3))  # landscape, so a turn changes the shape
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote; the tag says "turn 90 CW"
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "portrait.jpg")
    stored.save(path, quality=95, exif=exif)
    want = torch.from_numpy(np.array(upright)).permute(2, 0, 1).float()
    pil = torch.from_numpy(np.array(load_pil_rgb(path))).permute(2, 0, 1)
    for got in (decode_rgb(path), pil, _decode_one(path)):
        assert got.shape == want.shape
        assert (got.float() - want).abs().mean() < 3  # JPEG rounding only; sideways would be a different shape
    tf = build_eval_transform({"img_size": 64, "resize_size": 64, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    x, _, err = ImageFiles([path], tf)[0]
    assert err is None and (x - tf(upright)).abs().mean() < 0.05


@pytest.mark.parametrize("scale_min", [0.08, 0.25, 0.6, 1.0])
def test_train_decode_side_leaves_every_random_crop_at_least_img_size(scale_min):
    """The reduced decode's promise: on an image whose shorter side is train_decode_side, no RandomResizedCrop of
    the recipe's scale range (torchvision's own draw, landscape, portrait, square, panorama) is under img_size."""
    from utils.data.images import train_decode_side

    side = train_decode_side(224, scale_min)
    assert side >= 224 and (scale_min < 1 or side <= 260)
    crop = build_train_transform(224, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(scale_min, 1.0)).transforms[2]
    torch.manual_seed(0)
    smallest = min(min(crop.make_params([torch.empty(3, *hw, dtype=torch.uint8)])["height"],
                       crop.make_params([torch.empty(3, *hw, dtype=torch.uint8)])["width"])
                   for hw in ((side, side * 4 // 3), (side * 4 // 3, side), (side, side), (side, 3 * side))
                   for _ in range(500))
    assert 224 <= smallest and (scale_min == 1.0 or smallest < 224 * 1.1)  # tight: a smaller side would cut crops below 224 px


def test_large_jpeg_decodes_reduced_for_training_only(tmp_path):
    """A phone-sized real photo decodes at a DCT scale that keeps its shorter side >= min_side (and upright by
    its EXIF tag); the pixels match the full decode shrunk to that size; smaller JPEGs, PNGs and corrupt files
    take the full decoder. Validation and evaluate.py never pass min_side (they match the exported files)."""
    from utils.data import decode_rgb
    from utils.data.loaders import _TrainFiles

    photo = Image.open(os.path.join(PHOTOS, "ibex.jpg")).convert("RGB").resize((2400, 1800), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the reduced decode must turn it upright too
    jpg, png = str(tmp_path / "phone.jpg"), str(tmp_path / "phone.png")
    photo.save(jpg, quality=95, exif=exif)
    photo.resize((600, 450)).save(png)
    full = decode_rgb(jpg)
    assert full.shape == (3, 2400, 1800)  # upright: portrait
    for min_side, want in ((300, (3, 600, 450)), (451, (3, 1200, 900)), (901, (3, 2400, 1800))):
        got = decode_rgb(jpg, min_side)
        assert got.shape == want, min_side  # 1/4, 1/2, and 1/1 (1800 < 2 x 901: no reduction)
        small = torch.nn.functional.interpolate(full[None].float(), size=want[1:], mode="area")[0]
        assert (got.float() - small).abs().mean() < 2.5  # the same picture, shrunk
    assert torch.equal(decode_rgb(jpg, 901), full)
    assert torch.equal(decode_rgb(png, 100), decode_rgb(png))  # only JPEGs have a scaled decode
    broken = str(tmp_path / "broken.jpg")
    with open(jpg, "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(OSError, match="truncated"):
        decode_rgb(broken, 300)
    tf = build_train_transform(64, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.6, 1.0))
    x, label = _TrainFiles([(jpg, 3)], tf, 100)[(0, 7)]
    assert x.shape == (3, 64, 64) and label == 3
    assert _TrainFiles([(broken, 3)], tf, 100)[(0, 7)][0] is None  # skipped and counted, as before


def test_a_200_megapixel_photo_is_a_photo_not_a_decompression_bomb(tmp_path, monkeypatch):
    """Pillow refuses images over 179 MP (and warns over 89 MP), a guard for services decoding hostile uploads.
    A user's own 200 MP phone photo (16320 x 12240) or a line-scan image was therefore "unreadable" to
    split_dataset.py, and the PIL paths skipped it. utils.data opens images with the limit raised to 1 gigapixel."""
    from utils.data import decode_rgb
    from utils.data.folders import LARGEST_IMAGE_PIXELS, open_image
    from utils.data.images import pil_from_bytes
    from utils.data.split import _check_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default, whatever ran before
    big = str(tmp_path / "pano.jpg")
    Image.open(os.path.join(PHOTOS, "ibex.jpg")).convert("L").resize((16320, 12240), Image.BILINEAR).save(big, quality=50)
    with open(big, "rb") as f:
        data = f.read()
    with pytest.raises(Image.DecompressionBombError):  # what Pillow alone does with it
        Image.open(big)
    assert _check_image(data) == (None, "L", 16320 / 12240)  # split_dataset.py keeps it (and its 4:3 shape)
    assert Image.MAX_IMAGE_PIXELS == LARGEST_IMAGE_PIXELS == 2 ** 30
    assert pil_from_bytes(data).size == (16320, 12240)  # the PIL path (predict's fallback, report thumbnails)
    assert decode_rgb(big, 300).shape == (3, 1530, 2040)  # training: decoded at 1/8 scale
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a user who switched the guard off keeps it off
    open_image(big).close()
    assert Image.MAX_IMAGE_PIXELS is None


def test_report_thumbnails_and_mistakes_grid_show_what_training_saw(tmp_path):
    """report.html's thumbnails and mistakes.png draw a 16-bit scan and a sideways-stored phone photo exactly as
    their 8-bit / upright twins (PIL's plain convert("RGB") drew the scan white and the photo on its side)."""
    import base64

    from utils.plots import plot_mistakes
    from utils.trust.report import _thumbnail

    photo = Image.open(os.path.join(PHOTOS, "ibex.jpg")).convert("RGB")
    photo = photo.crop((0, 0, photo.width, photo.height * 2 // 3))  # landscape, so a turn changes the shape
    grey = photo.convert("L")
    grey.save(tmp_path / "grey8.png")
    Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257).save(tmp_path / "grey16.png")  # I;16
    photo.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 CW to view"
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)

    def thumb(name: str) -> np.ndarray:
        url = _thumbnail(str(tmp_path / name))
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=int)

    def grid(name: str) -> np.ndarray:
        out = str(tmp_path / f"mistakes_{name}")
        plot_mistakes([{"file": str(tmp_path / name), "true": "a", "predicted": "b", "confidence": 0.9}], out)
        return np.asarray(Image.open(out).convert("RGB"), dtype=int)

    for wide, plain in (("grey16.png", "grey8.png"), ("sideways.png", "upright.png")):
        a, b = thumb(wide), thumb(plain)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, wide
        a, b = grid(wide), grid(plain)
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5, wide
    assert thumb("grey16.png").mean() < 200  # not the white square of a clipped 16-bit scan


def test_unreadable_file_errors_read_the_same_in_every_decoder(tmp_path):
    """An empty file and a text file named .png give one fixed message in every decoder (the report.csv of a
    re-run is identical: no ``<_io.BytesIO object at 0x...>`` address in it)."""
    from utils.data import ImageFiles, decode_rgb, describe_error
    from utils.data.loaders import _decode_one
    from utils.data.split import _check_image

    empty, empty_png, fake = tmp_path / "empty.jpg", tmp_path / "empty.png", tmp_path / "fake.png"
    empty.write_bytes(b"")
    empty_png.write_bytes(b"")  # the memory cache's PNG route (libpng) must not answer it first
    fake.write_bytes(b"not an image: a text file with a .png name\n")
    want = {str(empty): "OSError: empty file (0 bytes)", str(empty_png): "OSError: empty file (0 bytes)",
            str(fake): "UnidentifiedImageError: cannot identify image file (not an image, or a format Pillow cannot "
                       "read)"}
    tf = build_eval_transform({"img_size": 32, "resize_size": 32, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    for p, message in want.items():
        with pytest.raises(Exception) as e:
            decode_rgb(p)
        assert describe_error(e.value) == message
        assert _decode_one(p) == message
        assert ImageFiles([p], tf)[0][2] == message
    assert _check_image(fake.read_bytes()) == (f"unreadable image ({want[str(fake)]})", "", 1.0)


def test_corrupt_image_is_skipped_and_counted(fm, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(fm, data)
    victim = sorted((data / "train" / "Bag").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated after the PNG header
    b = _load(str(data), cache="none", batch_size=10)
    b.set_epoch(0)
    sizes = [len(y) for _, y in b.train_loader]
    assert sum(sizes) == 149 and b.skipped == 1 and b.train_loader.skipped_files == [str(victim)]
    assert capsys.readouterr().err.count(f"warning: skipped unreadable image {victim} (") == 1  # one line
    m = _load(str(data), cache="memory", batch_size=10)
    assert m.num_train == 149 and m.skipped == 1
    assert capsys.readouterr().err.count(f"warning: skipped unreadable image {victim} (") == 1


def _ddp_worker(rank: int, data_dir: str, port: str, out: str) -> None:
    import torch.distributed as tdist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        b = _load(data_dir, cache="none", batch_size=4, distributed=True)
        torch.save({"train": _epoch(b, 2), "val": [y for _, y in b.val_loader]}, f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


def test_real_torch_distributed_process_group(fm, tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    mp.spawn(_ddp_worker, args=(fm, port, str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in (0, 1)]
    one = _epoch(_load(fm, cache="none", batch_size=8), 2)
    for (x, y), (x0, y0), (x1, y1) in zip(one, ranks[0]["train"], ranks[1]["train"]):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1) and torch.equal(y[1::2], y1)
    assert sum(len(y) for r in ranks for y in r["val"]) == 50


def test_last_partial_batch_is_kept_unless_a_rank_would_get_one_image():
    from utils.data import EpochBatchSampler

    def sizes(n, b, world=1, rank=0):
        return [len(x) for x in EpochBatchSampler(n, b, shuffle=True, rank=rank, world=world)]

    assert sizes(56, 32) == [32, 24]            # the finetune case: 56 images, batch 32
    assert sizes(33, 32) == [32]                # a lone last image would break BatchNorm: dropped
    assert sizes(10, 32) == [10]                # smaller than one batch: one batch
    assert sizes(101, 8, world=2, rank=1) == [8] * 6 + [3]   # wrapped to a multiple of the world size
    seen = {i for r in range(2) for batch in EpochBatchSampler(101, 8, shuffle=True, rank=r, world=2)
            for i, _ in batch}
    assert seen == set(range(101))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (the 194 KB "photo" of 40000x40000 a user met is this,
    plus compressed zeros): signature, IHDR and IEND with correct CRCs, no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_limit_is_refused_alike_by_every_decoder(tmp_path, monkeypatch):
    """A 1.6 gigapixel PNG trained through libpng (memory cache, no limit: 8.5 GB), printed Pillow's raw
    DecompressionBombWarning and took 18 GB in predict.py, and split_dataset.py called it unreadable. Now every
    decoder refuses an image over the limit from its header, before decoding, with one reason naming its size."""
    from utils.data import decode_rgb
    from utils.data.folders import ImageTooLarge, check_encoded_size, open_image
    from utils.data.images import load_pil
    from utils.data.loaders import _decode_one
    from utils.data.split import _check_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default: the first use raises it
    reason = "40000x40000 pixels (1,600 MP) is over the 1,074 MP limit for one image; downscale it"
    for name, data in (("declared.png", _png_header_only(40000, 40000)),
                       ("declared_as.jpg", _png_header_only(40000, 40000))):  # a PNG under a .jpg name: torchvision path
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageTooLarge, match=reason.replace("(", r"\(").replace(")", r"\)")):
            decode_rgb(str(path))  # training without a cache, and train.py's validation
        with pytest.raises(ImageTooLarge, match="1,600 MP"):
            load_pil(str(path))  # evaluate, predict, export
        assert _decode_one(str(path)) == f"ImageTooLarge: {reason}"  # the memory cache
        assert _check_image(data) == (f"unreadable image (ImageTooLarge: {reason})", "", 1.0)  # split_dataset.py
    with pytest.raises(ImageTooLarge, match="^2,500 MP is over the 1,074 MP limit"):  # > 2x: Pillow's own error
        open_image(io.BytesIO(_png_header_only(50000, 50000)))
    check_encoded_size(_png_header_only(32768, 32768))  # exactly 1 GP: allowed

    # Real photos against a lowered limit: JPEG (libjpeg, reduced-size decode), PNG (libpng) and PIL alike.
    import utils.data.folders as folders

    monkeypatch.setattr(folders, "LARGEST_IMAGE_PIXELS", 50_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    photo = Image.open(os.path.join(PHOTOS, "ibex.jpg"))
    jpg, png = str(tmp_path / "photo.jpg"), str(tmp_path / "photo.png")
    photo.save(jpg)
    photo.save(png)
    size = f"{photo.width}x{photo.height} pixels ({photo.width * photo.height / 1e6:.3g} MP) is over the 0.05 MP limit"
    for path in (jpg, png):
        for decode in (decode_rgb, partial(decode_rgb, min_side=64), load_pil):
            with pytest.raises(ImageTooLarge, match=size.replace("(", r"\(").replace(")", r"\)")):
                decode(path)
        assert size in _decode_one(path)
    assert decode_rgb(_png(SAMPLE)).shape == (3, 28, 28)  # under the limit: decoded as before


def _png(folder: str) -> str:
    cls = sorted(os.listdir(folder))[0]
    return os.path.join(folder, cls, sorted(os.listdir(os.path.join(folder, cls)))[0])


def test_an_animated_gif_under_a_jpg_name_decodes_to_its_first_frame(tmp_path):
    """torchvision decodes every frame of a GIF, (frames, 3, H, W): one such file under a .jpg/.png name
    crashed the batch collation of training without a cache. Every path now takes the first frame, as PIL does."""
    from utils.data import decode_rgb
    from utils.data.images import load_pil_rgb

    frames = [Image.open(os.path.join(PHOTOS, f)).convert("RGB").resize((64, 48)) for f in ("ibex.jpg", "goldfish.jpg")]
    for name in ("anim.jpg", "anim.png", "anim.gif"):  # a .gif is an image file too
        path = str(tmp_path / name)
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100)
        got = decode_rgb(path)
        assert is_image_file(path) and got.shape == (3, 48, 64)
        assert torch.equal(got, torch.from_numpy(np.array(load_pil_rgb(path))).permute(2, 0, 1))


def test_a_folder_link_up_the_tree_is_not_entered(tmp_path):
    """`Bag/up -> ..` listed every other class's images as Bags too (and the split then found 117 'labelling
    conflicts' and a val split of one class); a link to the folder itself or above it is not entered."""
    from utils.data.folders import images_under

    raw = tmp_path / "raw"
    for cls in ("Bag", "Coat"):
        shutil.copytree(os.path.join(SAMPLE, cls), raw / cls)
    os.symlink("..", raw / "Bag" / "up")
    os.symlink(os.path.join("..", ".."), raw / "Coat" / "upup")
    os.symlink(os.path.join("..", "Coat"), raw / "Bag" / "coat_link")  # a link to a sibling is followed, as before
    bag = images_under(str(raw / "Bag"))
    assert len(bag) == 40 and sum("coat_link" in p for p in bag) == 20
    assert len(images_under(str(raw / "Coat"))) == 20
    assert len(images_under(str(raw))) == 40  # from the top, each folder once: Coat is not walked again by its link


def test_a_class_folder_without_images_in_train_is_an_error(tmp_path):
    """An empty class folder in train/ became a class the model is never shown (ratio 'inf', predicted by
    predict.py); split_dataset.py leaves such folders out, a split by hand now gets one line."""
    data = tmp_path / "data"
    for part in ("train", "val"):
        for cls in ("Bag", "Coat"):
            shutil.copytree(os.path.join(SAMPLE, cls), data / part / cls)
        (data / part / "Empty class").mkdir()
    with pytest.raises(UserError, match=r"data/train: class folder\(s\) without images: Empty class; add images to "
                                        r"them or delete them from every split"):
        load_data(str(data), img_size=32, resize_size=32, mean=[0.5] * 3, std=[0.5] * 3, batch_size=8, workers=0,
                  augment={}, progress=False)


def test_a_thin_strip_is_cut_to_16_to_1_before_its_resize_and_trains(tmp_path):
    """A 3 x 60,000 px strip resized to a shorter side of 256 would be 256 x 5,120,000 px (3.9 GB) for a 224 px
    center crop: its long side is cut to 16x the short one first. Any photo or panorama is resized as
    torchvision's T.Resize does, to the bit."""
    from torchvision.transforms import v2 as T

    from utils.data.transforms import MAX_ASPECT, resize_shorter

    pre = {"img_size": 224, "resize_size": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    tf = build_eval_transform(pre)
    plain = T.Compose([T.PILToTensor(), T.Resize(256, antialias=True), T.CenterCrop(224),
                       T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    photo = Image.open(os.path.join(PHOTOS, "ibex.jpg")).convert("RGB")
    for size in (photo.size, (400, 300), (300, 4000), (MAX_ASPECT * 20, 20)):  # photo, portrait, 16:1 panorama
        im = photo.resize(size)
        assert torch.equal(tf(im), plain(im)), size
    strip = photo.resize((3, 60000))
    t = T.functional.pil_to_tensor(strip)
    assert tuple(resize_shorter(t, 256).shape) == (3, 256 * MAX_ASPECT, 256)  # not 256 x 5,120,000
    middle = strip.crop((0, (60000 - 48) // 2, 3, (60000 - 48) // 2 + 48))
    assert torch.equal(tf(strip), plain(middle))
    # in a training folder: every loader (per-step decode, memory cache of mixed sizes) yields full batches
    raw = tmp_path / "raw"
    for cls, names in (("a", ("ibex.jpg", "goldfish.jpg")), ("b", ("forklift.jpg", "fireboat.jpg"))):
        (raw / cls).mkdir(parents=True)
        for n in names:
            shutil.copy(os.path.join(PHOTOS, n), raw / cls / n)
        strip.save(raw / cls / "strip.png")
        strip.transpose(Image.Transpose.ROTATE_90).save(raw / cls / "wide.png")
    data = tmp_path / "data"
    split_dataset(str(raw), str(data), val=0.5, seed=0)
    for cache in ("none", "memory"):
        b = _load(str(data), cache=cache, img_size=48, resize_size=56, batch_size=4, augment={})
        n = sum(len(x) for x, _ in b.train_loader) + sum(len(x) for x, _ in b.val_loader)
        assert n == 8 and b.cache == cache
