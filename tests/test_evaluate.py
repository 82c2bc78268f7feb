"""evaluate.py: numbers checked by hand on real photos, output files, class checks and error messages."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import unicodedata

import pytest
import torch
from eval_helpers import PHOTOS, PREPROCESS, make_checkpoint, make_class_folders, photo_paths
from PIL import Image

import evaluate
from utils.data import build_eval_transform
from utils.deploy.runtime import LoadedModel
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread
CLASSES = ["animal", "object", "scene"]
# photo -> (true class, probabilities the stub model gives for animal/object/scene)
TABLE = {
    "black_swan": ("animal", [0.8, 0.1, 0.1]),
    "giant_panda": ("animal", [0.7, 0.2, 0.1]),
    "goldfish": ("animal", [0.05, 0.9, 0.05]),   # mistake, confidence 0.9
    "ibex": ("animal", [0.3, 0.1, 0.6]),         # mistake, confidence 0.6
    "forklift": ("object", [0.1, 0.8, 0.1]),
    "golf_ball": ("object", [0.2, 0.7, 0.1]),
    "hourglass": ("object", [0.75, 0.2, 0.05]),  # mistake, confidence 0.75
    "mosque": ("scene", [0.1, 0.1, 0.8]),
    "fireboat": ("scene", [0.2, 0.2, 0.6]),
}


def photo(name):
    return os.path.join(PHOTOS, name + ".jpg")


@pytest.fixture
def table_data(tmp_path):
    groups = {c: [photo(n) for n, (t, _) in TABLE.items() if t == c] for c in CLASSES}
    return make_class_folders(str(tmp_path / "data"), groups)


def stub_model(classes=CLASSES):
    """A LoadedModel whose output for each real photo is fixed by TABLE (images recognised by their pixels)."""
    tf = build_eval_transform(PREPROCESS)
    refs = [(tf(Image.open(photo(n))), torch.tensor(p).log()) for n, (_, p) in TABLE.items()]
    pad = len(classes) - len(CLASSES)

    def run(x):
        rows = []
        for img in x:
            match = [logit for ref, logit in refs if torch.allclose(ref, img, atol=1e-5)]
            assert len(match) == 1, "stub model got an image that is not in TABLE"
            rows.append(torch.cat([match[0], torch.full((pad,), -30.0)]))
        return torch.stack(rows)

    return LoadedModel("stub.pt", "checkpoint", list(classes), dict(PREPROCESS), run, torch.device("cpu"))


def test_metrics_match_hand_computed_values(table_data, tmp_path):
    res = evaluate.evaluate(stub_model(), table_data, batch_size=4, workers=0, progress=False)
    m = res["metrics"]
    assert res["cm_names"] == CLASSES
    assert res["cm"].tolist() == [[2, 1, 1], [1, 2, 0], [0, 0, 2]]
    by_class = {r["class"]: r for r in res["per_class"]}
    assert by_class["animal"]["precision"] == pytest.approx(2 / 3)
    assert by_class["animal"]["recall"] == pytest.approx(0.5)
    assert by_class["animal"]["f1"] == pytest.approx(4 / 7)
    assert by_class["object"]["f1"] == pytest.approx(2 / 3)
    assert by_class["scene"]["recall"] == pytest.approx(1.0)
    assert by_class["scene"]["f1"] == pytest.approx(0.8)
    assert [by_class[c]["support"] for c in CLASSES] == [4, 3, 2]
    assert m["images"] == 9 and m["skipped"] == 0
    assert m["top1"] == pytest.approx(100 * 6 / 9)
    assert m["top5"] == pytest.approx(100.0)
    p_true = [p[CLASSES.index(t)] for t, p in TABLE.values()]
    assert m["loss"] == pytest.approx(-sum(math.log(p) for p in p_true) / 9, rel=1e-5)
    assert m["label_smoothing"] == 0.0 and m["loss_label_smoothed"] == pytest.approx(m["loss"])
    assert m["macro_f1"] == pytest.approx((4 / 7 + 2 / 3 + 0.8) / 3)
    assert m["balanced_acc"] == pytest.approx(100 * (2 / 4 + 2 / 3 + 2 / 2) / 3)  # mean per-class recall
    assert "balanced accuracy 72.22%  macro-F1 0.6794" in evaluate.summary_line(m)
    # mistakes, most confident first
    assert [(os.path.basename(r["file"]), r["true"], r["predicted"]) for r in res["mistakes"]] == [
        ("goldfish.jpg", "animal", "object"), ("hourglass.jpg", "object", "animal"), ("ibex.jpg", "animal", "scene")]
    assert [r["confidence"] for r in res["mistakes"]] == pytest.approx([0.9, 0.75, 0.6], abs=1e-6)

    files = evaluate.write_outputs(res, str(tmp_path / "out"))
    with open(files["confusion_matrix.csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\predicted"] + CLASSES
    assert rows[1:] == [["animal", "2", "1", "1"], ["object", "1", "2", "0"], ["scene", "0", "0", "2"]]
    with open(files["per_class.csv"]) as f:
        per_class = list(csv.DictReader(f))
    assert [(r["class"], r["precision"], r["recall"], r["f1"], r["support"]) for r in per_class] == [
        ("animal", "0.6667", "0.5000", "0.5714", "4"), ("object", "0.6667", "0.6667", "0.6667", "3"),
        ("scene", "0.6667", "1.0000", "0.8000", "2")]
    with open(files["mistakes.csv"]) as f:
        mistakes = list(csv.DictReader(f))
    assert [(os.path.basename(r["file"]), r["confidence"]) for r in mistakes] == [
        ("goldfish.jpg", "0.9000"), ("hourglass.jpg", "0.7500"), ("ibex.jpg", "0.6000")]
    saved = json.load(open(files["metrics.json"]))
    assert saved["top1"] == pytest.approx(m["top1"]) and saved["images"] == 9
    for png in ("confusion_matrix.png", "mistakes.png"):
        with Image.open(files[png]) as im:
            assert im.format == "PNG" and im.width > 300
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_unreadable_image_is_skipped_and_reported(table_data):
    bad = os.path.join(table_data, "scene", "broken.jpg")
    with open(photo("mosque"), "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read()[:300])  # a truncated JPEG
    res = evaluate.evaluate(stub_model(), table_data, batch_size=4, workers=0, progress=False)
    assert res["metrics"]["images"] == 9 and res["metrics"]["skipped"] == 1
    assert res["metrics"]["skipped_files"][0]["file"] == bad
    assert res["cm"].tolist() == [[2, 1, 1], [1, 2, 0], [0, 0, 2]]


def test_subset_of_model_classes_is_allowed_and_reported(table_data):
    res = evaluate.evaluate(stub_model(CLASSES + ["vehicle"]), table_data, batch_size=16, workers=0, progress=False)
    assert res["cm_names"] == CLASSES  # 'vehicle' neither present nor predicted
    assert res["metrics"]["model_classes_not_in_data"] == ["vehicle"]
    assert any("3 of the model's 4 classes" in n and "vehicle" in n for n in res["notes"])


def test_class_mismatch_lists_the_differences(tmp_path):
    data = make_class_folders(str(tmp_path / "d"), {"animal": [photo("ibex")], "plant": [photo("mosque")]})
    with pytest.raises(UserError) as e:
        evaluate.evaluate(stub_model(), data, workers=0, progress=False)
    msg = str(e.value)
    assert "not known to the model: plant" in msg
    assert "model classes without a folder: object, scene" in msg
    assert data in msg


def test_class_folder_names_match_whatever_their_unicode_form(tmp_path):
    """A folder written by macOS spells 'scène' as 'sce' + combining grave (NFD), the model's name (typed on
    Linux) is NFC: both print the same, so refusing them would be an error no one can read. They are one class."""
    nfc = ["animal", "object", "sc\u00e8ne"]
    groups = {c: [photo(n) for n, (t, _) in TABLE.items() if t == c] for c in CLASSES}
    data = make_class_folders(str(tmp_path / "d"), {"animal": groups["animal"], "object": groups["object"],
                                                     unicodedata.normalize("NFD", nfc[2]): groups["scene"]})
    assert sorted(os.listdir(data))[2] != nfc[2]  # the folder really is NFD on disk
    res = evaluate.evaluate(stub_model(nfc), data, batch_size=16, workers=0, progress=False)
    assert res["metrics"]["top1"] == pytest.approx(100 * 6 / 9)  # the scene photos scored as the model's scène
    assert res["metrics"]["model_classes_not_in_data"] == []


def test_split_root_instead_of_split_is_explained(tmp_path):
    root = tmp_path / "DATA"
    make_class_folders(str(root / "train"), {"animal": [photo("ibex")]})
    make_class_folders(str(root / "val"), {"animal": [photo("goldfish")]})
    with pytest.raises(UserError, match=r"holds split folders \(train, val\), not class folders; pass one split, "
                                        r"e.g. .*DATA/val"):
        evaluate.evaluate(stub_model(), str(root), workers=0, progress=False)


def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "animal").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no images found in .*empty.*<class name>"):
        evaluate.evaluate(stub_model(), str(tmp_path / "empty"), workers=0, progress=False)
    with pytest.raises(UserError, match="data folder .*missing not found"):
        evaluate.evaluate(stub_model(), str(tmp_path / "missing"), workers=0, progress=False)


def test_end_to_end_checkpoint_split_name_and_default_out(tmp_path):
    """Real tiny model fitted on real photos; DATA given as the split name of the run's config."""
    names = [os.path.splitext(os.path.basename(p))[0] for p in photo_paths()]
    run = tmp_path / "run"
    data_root = tmp_path / "DATA"
    make_class_folders(str(data_root / "val"), {n: [p] for n, p in zip(names, photo_paths())})
    make_checkpoint(str(run / "best.pt"), names, [(p, i) for i, p in enumerate(photo_paths())],
                    config={"data": str(data_root)})
    metrics = evaluate.main([str(run / "best.pt"), "val", "--batch-size", "5", "--workers", "1", "--no-progress"])
    out = run / "eval"
    assert sorted(os.listdir(out)) == sorted(["metrics.json", "per_class.csv", "confusion_matrix.csv",
                                              "confusion_matrix.png", "mistakes.csv", "mistakes.png",
                                              "reliability.png", "coverage.png", "coverage.csv", "report.html"])
    assert metrics["data"] == str(data_root / "val") and metrics["images"] == 12
    with open(out / "confusion_matrix.csv") as f:
        cm = [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]
    correct = sum(cm[i][i] for i in range(len(cm)))
    assert sum(map(sum, cm)) == 12
    assert metrics["top1"] == pytest.approx(100 * correct / 12)
    assert metrics["top1"] >= 75  # it was fitted on these very photos
    with open(out / "mistakes.csv") as f:
        rows = list(csv.DictReader(f))
    conf = [float(r["confidence"]) for r in rows]
    assert len(conf) == 12 - correct and conf == sorted(conf, reverse=True)
    # the calibrated value report.html and predict.py show, next to the softmax: a temperature above 1 lowers the
    # top probability, below 1 raises it
    t = metrics["calibration"]["temperature"]
    assert t != 1.0 and all((float(r["calibrated_confidence"]) < float(r["confidence"])) == (t > 1) for r in rows)
    assert metrics["images_per_s"] > 0


def test_cli_errors_print_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model at all")
    r = subprocess.run([sys.executable, "evaluate.py", str(bad), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: cannot read model file {bad}: it is not a valid checkpoint, TorchScript or ONNX")
    assert "Traceback" not in r.stderr
    # a bad --target-accuracy is refused when the command line is read, before the model file is even opened
    r = subprocess.run([sys.executable, "evaluate.py", str(bad), str(tmp_path), "--target-accuracy", "99"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("evaluate.py: error: argument --target-accuracy: must be in (0, 1], "
                                                 "e.g. 0.99 for 99%; got 99")


def test_exported_onnx_finds_split_through_run_config_and_agrees(tmp_path):
    """RUN/export/model.onnx + 'val': the data folder comes from RUN/config.yaml; results match the checkpoint."""
    from eval_helpers import export_onnx

    names = [os.path.splitext(os.path.basename(p))[0] for p in photo_paths()]
    data_root = tmp_path / "DATA"
    make_class_folders(str(data_root / "val"), {n: [p] for n, p in zip(names, photo_paths())})
    run = tmp_path / "run"
    ckpt = make_checkpoint(str(run / "best.pt"), names, [(p, i) for i, p in enumerate(photo_paths())])
    (run / "export").mkdir()
    onnx_path = export_onnx(ckpt, str(run / "export" / "model.onnx"))
    with pytest.raises(UserError, match=r"'val' is a split name, but neither .*model\.onnx nor a config\.yaml"):
        evaluate.main([onnx_path, "val", "--no-progress"])
    (run / "config.yaml").write_text(f"data: {data_root}\nmodel: mobilenet_v2\n")
    m_onnx = evaluate.main([onnx_path, "val", "--no-progress", "--workers", "0"])
    m_ckpt = evaluate.main([ckpt, str(data_root / "val"), "--no-progress", "--workers", "0"])
    assert os.path.isfile(run / "export" / "eval_model_onnx" / "confusion_matrix.png")
    assert m_onnx["kind"] == "onnx" and m_onnx["images"] == 12
    assert m_onnx["top1"] == m_ckpt["top1"] and m_onnx["top5"] == m_ckpt["top5"]
    assert m_onnx["loss"] == pytest.approx(m_ckpt["loss"], abs=1e-4)
    assert [r["support"] for r in m_onnx["per_class"]] == [r["support"] for r in m_ckpt["per_class"]]


def test_fashion_mnist_sample_greyscale_pngs_with_workers(tmp_path):
    """The committed real Fashion-MNIST sample (28x28 greyscale PNG, 10 x 20) through DataLoader workers."""
    sample = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
    classes = sorted(os.listdir(sample))
    assert len(classes) == 10
    ckpt = make_checkpoint(str(tmp_path / "best.pt"), classes)
    # drop one class folder from the data: a subset, reported, still evaluated
    data = make_class_folders(str(tmp_path / "val"), {
        c: [os.path.join(sample, c, f) for f in sorted(os.listdir(os.path.join(sample, c)))] for c in classes[1:]})
    m = evaluate.main([ckpt, data, "--batch-size", "64", "--workers", "2", "--no-progress"])
    assert m["images"] == 180 and m["skipped"] == 0
    assert [r["support"] for r in m["per_class"] if r["class"] != classes[0]] == [20] * 9
    assert m["model_classes_not_in_data"] == [classes[0]]
    with open(tmp_path / "eval" / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert sum(int(v) for r in rows for v in r[1:]) == 180


def test_reproduces_train_py_validation(tmp_path, capsys):
    """evaluate.py on a real train.py checkpoint gives the val numbers train.py logged for that epoch."""
    import train

    sample = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
    data = tmp_path / "data"
    for part in ("train", "val"):
        shutil.copytree(sample, data / part)
    run = tmp_path / "run"
    train.main(["--data", str(data), "--out", str(run), "--width-mult", "0.25", "--epochs", "1",
                "--batch-size", "50", "--lr", "0.05", "--workers", "0", "--set", "progress=false"])
    with open(run / "log.csv") as f:
        logged = list(csv.DictReader(f))[-1]
    m = evaluate.main([str(run / "best.pt"), "val", "--workers", "0", "--batch-size", "64", "--no-progress"])
    assert m["images"] == 200
    # train.py's val_loss uses its criterion (label smoothing from the config); plain CE is reported beside it
    assert m["label_smoothing"] == 0.1
    assert m["loss_label_smoothed"] == pytest.approx(float(logged["val_loss"]), abs=1e-3)
    assert m["top1"] == pytest.approx(float(logged["val_top1"]), abs=0.51)  # at most one near-tie flips
    assert m["top5"] == pytest.approx(float(logged["val_top5"]), abs=0.51)
    # balanced accuracy / macro-F1: the same function as train.py's val_bal_acc / val_macro_f1
    assert m["balanced_acc"] == pytest.approx(float(logged["val_bal_acc"]), abs=0.51)
    assert m["macro_f1"] == pytest.approx(float(logged["val_macro_f1"]), abs=0.01)
    assert f"balanced accuracy {m['balanced_acc']:.2f}%" in capsys.readouterr().out


def test_predicted_class_without_images_has_no_recall_in_the_table(table_data):
    shutil.rmtree(os.path.join(table_data, "scene"))  # ibex (an animal) is still predicted 'scene'
    res = evaluate.evaluate(stub_model(), table_data, batch_size=16, workers=0, progress=False)
    table = evaluate.format_report(res).splitlines()
    scene = next(line for line in table if line.startswith("scene"))
    assert scene.split() == ["scene", "0.000", "-", "-", "0"]
    macro = next(line for line in table if line.startswith("macro avg")).split()
    assert float(macro[3]) == pytest.approx((2 / 4 + 2 / 3) / 2, abs=5e-4)  # animal 2 of 4, object 2 of 3
    assert table[-1] == ("-: no image of scene in the data (only predicted), so no recall; "
                         "the macro average is over the 2 classes with images")
