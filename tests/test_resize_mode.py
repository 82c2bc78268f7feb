"""resize_mode: tall or wide images squashed whole to a square (auto when the training images are over 1.5:1),
the same in every loader, in the checkpoint and in evaluate.py; square folders keep the center crop."""
import os
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import evaluate
import train
from utils.checkpoint import Preprocess, load_checkpoint
from utils.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform, load_data
from utils.data.augment import AugmentConfig, augment_batch
from utils.data.samplers import sample_seeds
from utils.data.shape import SQUASH_ASPECT, choose_resize_mode, median_aspect
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "tests", "assets", "photos")
ANIMALS = ["black_swan", "fiddler_crab", "giant_panda", "goldfish", "ibex", "indigo_bunting"]
THINGS = ["fireboat", "forklift", "golf_ball", "hourglass", "mosque", "lesser_panda"]
PRE = {"img_size": 64, "resize_size": 64, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _strip(name: str, width: int = 96) -> Image.Image:
    """A real 256 x 256 photo cut to its middle ``width`` x 256 (portrait, 256 / width : 1)."""
    im = Image.open(os.path.join(PHOTOS, f"{name}.jpg")).convert("RGB")
    left = (256 - width) // 2
    return im.crop((left, 0, left + width, 256))


def _tall_split(root, widths=(96,)) -> str:
    """root/{train,val}/{animal,thing}/ of tall strips of the real photos: 5 train + 1 val per class."""
    for cls, names in (("animal", ANIMALS), ("thing", THINGS)):
        for i, n in enumerate(names):
            part = "val" if i == len(names) - 1 else "train"
            os.makedirs(os.path.join(root, part, cls), exist_ok=True)
            _strip(n, widths[i % len(widths)]).save(os.path.join(root, part, cls, f"{n}.png"))
    return str(root)


def test_auto_squashes_a_folder_of_tall_images_and_crops_square_or_4_3_ones(tmp_path):
    paths = []
    for i, (n, w) in enumerate(zip(ANIMALS, (96, 96, 96, 192, 192, 256))):  # 2.67:1 x3, 4:3 x2, square x1
        p = tmp_path / f"{i}.png"
        _strip(n, w).save(p)
        paths.append(str(p))
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not an image")  # unreadable: passed over, not counted
    assert median_aspect(paths[:3] + [str(fake)]) == (pytest.approx(256 / 96), 3)
    d = choose_resize_mode(paths[:3] + paths[3:4] + [str(fake)])  # 2.67, 2.67, 2.67, 1.33
    assert d == {"resize_mode": "squash", "median_aspect": round(256 / 96, 3), "images_read": 4,
                 "squash_above": SQUASH_ASPECT}
    assert train.resize_mode_line(d) == (
        "resize_mode auto -> squash: median training image 2.67:1 (4 read), a square center crop would keep 37% of "
        "it; each image is resized whole to a square (--set resize_mode=crop to crop instead)")
    d = choose_resize_mode(paths[3:])  # 4:3 photos (a phone's) and a square one: the ImageNet crop
    assert (d["resize_mode"], d["median_aspect"]) == ("crop", round(256 / 192, 3))
    assert train.resize_mode_line(d) == ("resize_mode auto -> crop: median training image 1.33:1 (3 read), at most "
                                         "1.5:1 (center / random square crops)")
    assert choose_resize_mode([str(fake)])["resize_mode"] == "crop"
    # more than `limit` images: evenly spaced headers, the first and the last among them
    assert median_aspect(paths[:1] * 3 + paths[5:] * 4, limit=2) == (pytest.approx((256 / 96 + 1) / 2), 2)


def test_squash_keeps_both_ends_and_every_loader_agrees(tmp_path):
    data = _tall_split(tmp_path / "tall")
    val_files = sorted(os.path.join(dirpath, f) for dirpath, _, fs in os.walk(os.path.join(data, "val")) for f in fs)
    squash, crop = build_eval_transform({**PRE, "resize_mode": "squash"}), build_eval_transform(PRE)
    im = Image.open(val_files[0])
    # squash: the whole strip, resized to 64 x 64; crop: its middle 96 x 96 only
    ref = torch.nn.functional.interpolate(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float(),
                                          size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0]
    got = squash(im) * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert (got * 255 - ref).abs().mean() < 1.0
    middle = crop(im.crop((0, 80, 96, 176)).resize((96, 96)))
    assert (crop(im) - middle).abs().mean() < 0.05
    assert (squash(im) - crop(im)).abs().mean() > 0.3
    kw = dict(img_size=64, resize_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=2, workers=0,
              augment={"scale": (1.0, 1.0), "hflip": 0.0}, seed=0, progress=False)
    mem = load_data(data, cache="memory", resize_mode="squash", **kw)  # all 96 x 256: stored squashed, once
    disk = load_data(data, cache="none", resize_mode="squash", **kw)
    assert (mem.cache, disk.cache) == ("memory", "none")
    want = torch.stack([squash(Image.open(p)) for p in val_files])
    for bundle in (mem, disk):  # validation: exactly build_eval_transform's squash
        assert torch.allclose(torch.cat([x for x, _ in bundle.val_loader]), want, atol=1e-6), bundle.cache
    # training with a whole-image crop and no flip: the squashed image itself on both paths, not its middle
    train_files = sorted(os.path.join(dirpath, f) for dirpath, _, fs in os.walk(os.path.join(data, "train"))
                         for f in fs)
    squashed = [squash(Image.open(p)) for p in train_files]
    cropped = [crop(Image.open(p)) for p in train_files]
    for bundle in (mem, disk):
        bundle.set_epoch(0)
        xs = torch.cat([x for x, _ in bundle.train_loader])
        assert len(xs) == len(train_files)
        near = [min((x - s).abs().mean().item() for s in squashed) for x in xs]
        far = [min((x - c).abs().mean().item() for c in cropped) for x in xs]
        print(bundle.cache, max(near), min(far))
        assert max(near) < 0.05 and min(far) > 0.3, (bundle.cache, near, far)
    # the crop mode of the same folder sees only the middle
    mid = load_data(data, cache="none", resize_mode="crop", **kw)
    assert torch.cat([x for x, _ in mid.val_loader]).sub(want).abs().mean() > 0.3
    with pytest.raises(UserError, match="resize_mode='pad': use one of crop, squash"):
        load_data(data, cache="none", resize_mode="pad", **kw)


def test_memory_train_augmentation_squashes_once_then_crops_at_random(tmp_path):
    data = _tall_split(tmp_path / "tall")
    b = load_data(data, img_size=64, resize_size=72, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=4, workers=0,
                  augment={}, cache="memory", seed=0, progress=False, resize_mode="squash")
    assert tuple(b.train_loader.images.shape[1:]) == (3, 96, 96)  # squash_side(256, 96, keep=72): the short side
    tf = build_train_transform(64, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_mode="squash", squash_keep=72)
    torch.manual_seed(0)
    assert tuple(tf(_strip("ibex")).shape) == (3, 64, 64)
    x = b.train_loader.images[:2]
    out = augment_batch(x, sample_seeds(0, 1, np.arange(2)), 64, AugmentConfig.from_dict({}), IMAGENET_MEAN,
                        IMAGENET_STD)
    assert tuple(out.shape) == (2, 3, 64, 64)


def test_preprocess_dict_reads_old_files_as_crop_and_refuses_an_unknown_mode():
    assert Preprocess.from_dict(PRE).resize_mode == "crop"  # written before resize_mode existed
    assert Preprocess.from_dict(PRE).as_dict() == PRE  # and written the same way: crop files do not change
    assert Preprocess.from_dict({**PRE, "resize_mode": "squash"}).as_dict() == {**PRE, "resize_mode": "squash"}
    with pytest.raises(UserError, match=re.escape("m.onnx: preprocess resize_mode 'pad' is not one of crop, squash "
                                                  "(a newer version wrote it?); re-export it")):
        Preprocess.from_dict({**PRE, "resize_mode": "pad"}, "m.onnx", "re-export it")


def test_train_decides_squash_records_it_and_evaluate_follows(tmp_path, capsys):
    data = _tall_split(tmp_path / "tall")
    out = tmp_path / "run"
    tiny = ["--model", "mobilenet_v2", "--width-mult", "0.25", "--img-size", "32", "--batch-size", "4", "--workers",
            "0", "--device", "cpu", "--set", "progress=false", "--set", "amp=off", "--epochs", "1"]
    train.main(tiny + ["--data", data, "--out", str(out)])
    text = capsys.readouterr().out
    assert ("resize_mode auto -> squash: median training image 2.67:1 (10 read), a square center crop would keep 37% "
            "of it") in text, text
    with open(out / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["resize_mode"] == "squash"
    assert saved["resize_mode_auto"] == {"resize_mode": "squash", "median_aspect": 2.667, "images_read": 10,
                                         "squash_above": 1.5}
    best = load_checkpoint(str(out / "best.pt"))
    assert best["preprocess"]["resize_mode"] == "squash"
    fp32 = [line for line in text.splitlines() if line.startswith("best.pt on val in fp32")][-1]
    m = evaluate.main([str(out / "best.pt"), os.path.join(data, "val"), "--out", str(tmp_path / "eval"),
                       "--workers", "0", "--no-progress"])
    assert "(squash 32)" in capsys.readouterr().out
    assert f"top-1 {m['top1']:.2f}%" in fp32, fp32
    # a resumed run keeps its checkpoint's preprocessing, whatever auto would say now
    cfg = train.resolve_config(train.get_args_parser().parse_args(tiny + ["--data", data]))[0]
    data = train.find_data(cfg, None, False)[2]  # the training images' paths
    old = {"preprocess": {k: v for k, v in best["preprocess"].items() if k != "resize_mode"}}
    assert train.decide_resize_mode(cfg, old, data, False)[0].resize_mode == "crop"
    assert train.decide_resize_mode(cfg, None, data, False)[0].resize_mode == "squash"
    assert train.decide_resize_mode(cfg.__class__(**{**cfg.__dict__, "resize_mode": "crop"}), None, data,
                                    False) == (cfg.__class__(**{**cfg.__dict__, "resize_mode": "crop"}), None)


def test_split_dataset_says_what_train_will_do_with_the_shape(tmp_path):
    from utils.data.split import format_report, split_dataset

    raw = tmp_path / "raw"
    for cls, names in (("animal", ANIMALS), ("thing", THINGS)):
        os.makedirs(raw / cls)
        for n in names:
            _strip(n).save(raw / cls / f"{n}.png")
    report = format_report(split_dataset(str(raw), str(tmp_path / "split"), val=0.2, seed=0))
    assert ("image shape: median 2.67:1 (long / short side): train.py (resize_mode auto) will resize each image whole "
            "to a square rather than crop its middle 37%") in report.splitlines()
    square = tmp_path / "square"
    for cls, names in (("animal", ANIMALS), ("thing", THINGS)):
        os.makedirs(square / cls)
        for n in names:
            _strip(n, 192).save(square / cls / f"{n}.png")  # 4:3
    report = format_report(split_dataset(str(square), str(tmp_path / "split2"), val=0.2, seed=0))
    assert ("image shape: median 1.33:1 (long / short side): train.py (resize_mode auto) will use square crops"
            in report.splitlines())
