"""export.py's int8 check (utils/deploy/int8_check.py): exact interval numbers, and real exports on the Fashion-MNIST sample
where one flipped image on 40 validation images passes and a blank-calibrated (broken) int8 model is refused."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from export_helpers import SAMPLE, make_run  # noqa: E402
from PIL import Image

import export  # noqa: E402
from utils.data import list_labelled_images  # noqa: E402
from utils.deploy import export as ex  # noqa: E402
from utils.deploy.int8_check import judge_int8, paired_difference_interval, wilson_interval  # noqa: E402
from utils.errors import UserError  # noqa: E402


# ------------------------------------------------------------------------------------------- the intervals
def test_wilson_interval_exact():
    assert wilson_interval(0, 10) == (0.0, 0.2775327998628892)  # the textbook 0/10: 0 to 27.75%
    assert wilson_interval(29, 40) == (0.5716504419378943, 0.8389198375233267)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_newcombe_matches_published_example():
    # Fagerland, Lydersen & Laake, "Statistical analysis of contingency tables" (2017), chapter 8, Cavo et al.
    # 2012 table [[59, 6], [16, 80]]: Newcombe square-and-add estimate -0.0621, 95% CI -0.1186 to -0.0046.
    est, lo, hi = paired_difference_interval(59, 6, 16, 80)
    assert (round(est, 4), round(lo, 4), round(hi, 4)) == (-0.0621, -0.1186, -0.0046)
    assert (est, lo, hi) == pytest.approx((-0.06211180124223603, -0.11862119563870992, -0.004625113933050061),
                                          abs=1e-15)


def test_newcombe_small_folder_cases():
    # 40 images, fp32 right and int8 wrong on one (72.5% -> 70.0%): int8 is the first proportion
    assert paired_difference_interval(28, 0, 1, 11) == pytest.approx((-0.025, -0.10155265170662234,
                                                                      0.04958614327672582), abs=1e-15)
    # no disagreement at all: symmetric around 0, not a zero-width interval (a bootstrap would give [0, 0])
    assert paired_difference_interval(30, 0, 0, 10) == pytest.approx((0.0, -0.06410870673337783, 0.06410870673337782),
                                                                     abs=1e-15)
    # four flips of 40: -10 points, and the interval still reaches above 0
    assert paired_difference_interval(25, 0, 4, 11) == pytest.approx((-0.1, -0.20449787499330935,
                                                                      0.005460065352446655), abs=1e-15)
    # swapping the two models mirrors the interval
    est, lo, hi = paired_difference_interval(25, 4, 0, 11)
    assert (est, lo, hi) == pytest.approx((0.1, -0.005460065352446655, 0.20449787499330935), abs=1e-15)
    assert paired_difference_interval(0, 0, 0, 0) == (0.0, -1.0, 1.0)


def _preds(table):
    """fp32/int8 predictions and labels (10 classes) realising a 2x2 table (both, fp32 only, int8 only, neither)."""
    both, f_only, i_only, neither = table
    labels = torch.zeros(sum(table), dtype=torch.long)
    fp32 = torch.tensor([0] * both + [0] * f_only + [1] * i_only + [1] * neither)
    int8 = torch.tensor([0] * both + [2] * f_only + [0] * i_only + [1] * neither)
    return fp32, int8, labels


def test_judge_one_flip_passes_and_numbers():
    fp32, int8, labels = _preds((28, 1, 0, 11))
    v = judge_int8(fp32, int8, labels, None, None, [str(i) for i in range(10)], max_drop=1.0)
    assert (v.fp32_top1, v.int8_top1, v.change) == (72.5, 70.0, pytest.approx(-2.5))
    assert v.change_interval == pytest.approx((-10.155265170662234, 4.958614327672582))
    assert v.agreement == 97.5 and v.passed and v.reason() is None
    r = v.record()
    assert r["change"]["interval95"] == [-10.16, 4.96] and r["drop"] == 2.5 and r["top1_agree_with_fp32"] == 39
    assert r["per_class_recall"] == {"fp32": {"0": 72.5, **{str(i): None for i in range(1, 10)}},
                                     "int8": {"0": 70.0, **{str(i): None for i in range(1, 10)}}}
    assert v.summary() == ("int8 check   agreement 97.5% of 40 images (floor 90%) | val top-1 72.50% -> 70.00% on 40 "
                           "images, change -2.50 points, 95% interval [-10.16, +4.96] (allowed drop 1) | passed: no "
                           "significant loss, but 40 val images cannot rule out a drop of up to 10.16 points "
                           "(--val-data with more labelled images narrows it)")
    # enough images to rule out a drop over the allowed one: a plain pass; agreement shown per kind of image
    fp32, int8, labels = _preds((1990, 0, 0, 10))
    extra = torch.zeros(300, dtype=torch.long)
    v = judge_int8(fp32, int8, labels, extra, extra.clone(), ["a", "b", "c"], max_drop=1.0)
    assert v.summary().endswith("(allowed drop 1) | passed")
    assert v.summary().startswith("int8 check   agreement 100.0% of 2300 images: val 2000/2000, calibration "
                                  "300/300 (floor 90%) | ")


def test_judge_refuses_real_losses():
    # 2,000 images, 60 flips one way: -3 points, interval [-3.8, -2.3] entirely below -1
    fp32, int8, labels = _preds((1800, 60, 0, 140))
    v = judge_int8(fp32, int8, labels, None, None, ["a", "b", "c"], max_drop=1.0)
    assert v.accuracy_loss_real and not v.agreement_too_low and not v.passed
    assert "significantly more than --max-drop 1" in v.reason()
    # 40 images that agree on 20 only: no provable accuracy loss, but the agreement interval is below 90%
    fp32, int8, labels = _preds((10, 10, 10, 10))
    extra = torch.arange(20) % 3
    v = judge_int8(fp32, int8, labels, extra, extra.flip(0), ["a", "b", "c"], max_drop=1.0)
    assert not v.accuracy_loss_real and v.agreement_too_low and not v.passed
    assert v.agree_images == 60 and "agrees with fp32 on only" in v.reason()


# ------------------------------------------------------------------------------- real exports, real images
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny real checkpoint of tests/export_helpers.py, its fp32 + int8 export, and per-image predictions of
    both files on all 200 sample images."""
    root = tmp_path_factory.mktemp("int8check")
    ckpt = make_run(str(root))
    out = str(root / "export")
    export.main([ckpt, "--format", "int8", "--out", out, "--max-drop", "100", "--min-agreement", "0"])
    src = ex.load_export_source(ckpt)
    items = list_labelled_images(SAMPLE, src.classes)
    x = ex.load_images([p for p, _ in items], src.preprocess)
    fp32 = ex.batched_logits(ex.file_predictor(os.path.join(out, "model.onnx")), x).argmax(1)
    int8 = ex.batched_logits(ex.file_predictor(os.path.join(out, "model.int8.onnx")), x).argmax(1)
    return ckpt, root, items, fp32, int8


def _folder(root, name, items):
    """``root/name/<class>/`` with copies of the (path, label) items."""
    for path, _ in items:
        dst = root / name / os.path.basename(os.path.dirname(path))
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst)
    return str(root / name)


def test_one_flipped_image_of_40_passes(tiny, capsys):
    ckpt, root, items, fp32, int8 = tiny
    labels = torch.tensor([y for _, y in items])
    right_both = [items[i] for i in torch.nonzero((fp32 == labels) & (int8 == labels)).flatten().tolist()]
    wrong_same = [items[i] for i in torch.nonzero((fp32 != labels) & (int8 == fp32)).flatten().tolist()]
    flipped = [items[i] for i in torch.nonzero((fp32 == labels) & (int8 != labels)).flatten().tolist()]
    assert len(right_both) >= 28 and len(wrong_same) >= 11 and flipped
    val = _folder(root, "val40", right_both[:28] + wrong_same[:11] + flipped[:1])  # 72.5% -> 70.0%
    out = str(root / "one_flip")
    report = export.main([ckpt, "--format", "int8", "--out", out, "--val-data", val])  # default --max-drop 1
    chk = report["checks"]["int8"]
    assert chk["passed"] and os.path.isfile(os.path.join(out, "model.int8.onnx"))
    assert (chk["val_images"], chk["fp32_top1"], chk["int8_top1"], chk["drop"]) == (40, 72.5, 70.0, 2.5)  # old rule: refused
    assert chk["change"]["interval95"] == [-10.16, 4.96]
    assert chk["change"]["fp32_only_correct"] == 1 and chk["change"]["int8_only_correct"] == 0
    agreement = chk["agreement"]
    assert agreement["val_agree"] == 39 and agreement["extra_images"] == 120  # the 120 calibration (train) images
    assert agreement["images"] == 160 and agreement["percent"] > 90
    on_disk = json.load(open(os.path.join(out, "export.json")))["checks"]["int8"]
    assert set(on_disk["per_class_recall"]["fp32"]) == set(ex.load_export_source(ckpt).classes)
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("int8 check")]
    assert len(printed) == 1 and "val top-1 72.50% -> 70.00% on 40 images, change -2.50 points, 95% interval " \
                                  "[-10.16, +4.96] (allowed drop 1) | passed: no significant loss" in printed[0]
    assert f": val 39/40, calibration {agreement['extra_agree']}/120 (floor 90%)" in printed[0]


def test_blank_calibrated_int8_is_refused(tiny, tmp_path):
    ckpt, _, _, _, _ = tiny
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(20):  # a wrong --calib-data folder: black frames, real files
        Image.new("L", (28, 28), 0).save(blank / f"blank_{i:02d}.png")
    out = str(tmp_path / "broken")
    with pytest.raises(UserError, match=r"int8 model .* agrees with fp32 on only .* below --min-agreement 90"):
        export.main([ckpt, "--format", "int8", "--out", out, "--calib-data", str(blank)])
    assert not os.path.exists(os.path.join(out, "model.int8.onnx"))
    assert not [f for f in os.listdir(out) if "unverified" in f]
    # the same with --int8-fallback: the numbers land in export.json
    export.main([ckpt, "--format", "int8", "--out", out, "--calib-data", str(blank), "--int8-fallback"])
    chk = json.load(open(os.path.join(out, "export.json")))["checks"]["int8"]
    assert chk["passed"] is False and chk["agreement"]["interval95"][1] < 90 and chk["agreement"]["percent"] < 85
    assert chk["agreement"]["images"] == 80 + 20 and "agrees with fp32 on only" in chk["reason"]
    assert not os.path.exists(os.path.join(out, "model.int8.onnx"))
