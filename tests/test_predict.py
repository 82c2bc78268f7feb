"""predict.py on real photos: table, JSON, CSV, folders/globs, unreadable files skipped, formats agree."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from eval_helpers import PHOTOS, export_onnx, make_checkpoint, photo_paths
from PIL import Image

import predict
from utils.data import build_eval_transform
from utils.deploy.runtime import open_model
from utils.errors import UserError
from utils.log import rate_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in photo_paths()]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_model")
    return make_checkpoint(str(d / "best.pt"), NAMES, [(p, i) for i, p in enumerate(photo_paths())])


def expected_top(model_path, files, k):
    """Top-k computed directly (no DataLoader, no batching) for comparison."""
    m = open_model(model_path)
    tf = build_eval_transform(m.preprocess)
    probs = m.predict_batch(torch.stack([tf(Image.open(f)) for f in files])).softmax(1)
    p, i = probs.topk(k, dim=1)
    return [[(m.classes[c], float(q)) for c, q in zip(ii, pp)] for ii, pp in zip(i.tolist(), p)]


def test_folder_glob_json_csv_and_unreadable_files(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(PHOTOS, folder)
    (folder / "SOURCE.md").unlink()
    (folder / "notes.txt").write_text("not an image")          # ignored in folders (no image extension)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")  # unreadable: reported and skipped
    js, cs = tmp_path / "p.json", tmp_path / "p.csv"
    result = predict.main([ckpt, str(folder / "g*.jpg"), str(folder), str(tmp_path / "missing.jpg"),
                           "--topk", "3", "--json", str(js), "--csv", str(cs),
                           "--batch-size", "4", "--workers", "1", "--no-progress"])
    out, err = capsys.readouterr()
    good = sorted(str(folder / f) for f in os.listdir(folder) if f.endswith(".jpg") and f != "broken.jpg")
    got = [p["file"] for p in result["predictions"]]
    assert sorted(got) == good and len(got) == 12  # globbed files are not predicted twice
    assert "broken.jpg" in err and "skipped unreadable image" in err
    assert "missing.jpg: no such file" in err
    assert "12 images predicted, 2 skipped" in out and "images/s" in out

    want = dict(zip(good, expected_top(ckpt, good, 3)))
    for p in result["predictions"]:
        assert [t["class"] for t in p["top"]] == [c for c, _ in want[p["file"]]]
        assert [t["prob"] for t in p["top"]] == pytest.approx([q for _, q in want[p["file"]]], abs=1e-5)
    # table: header + rule + one line per image, top-1 class on each line
    lines = out.splitlines()
    assert lines[0] == f"(files in {folder})"  # shown relative to their shared folder
    assert lines[1].split() == ["file", "top-1", "top-2", "top-3"]
    for p in result["predictions"]:
        line = next(l for l in lines if l.startswith(os.path.basename(p["file"]) + " "))
        assert f"{p['top'][0]['class']} {100 * p['top'][0]['prob']:5.1f}%" in line

    doc = json.load(open(js))
    assert doc["kind"] == "checkpoint" and len(doc["predictions"]) == 12
    # every skipped input, as the summary line counts them: the unreadable file and the missing path
    assert [(os.path.basename(r["file"]), r["error"].split(":")[0]) for r in doc["skipped"]] == \
        [("broken.jpg", "UnidentifiedImageError"), ("missing.jpg", "no such file, or no images in that folder / "
                                                                   "matching that pattern")]
    rows = list(csv.DictReader(open(cs)))
    assert list(rows[0]) == ["file", "answer", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert [r["class_1"] for r in rows] == [p["top"][0]["class"] for p in result["predictions"]]
    assert [r["answer"] for r in rows] == [r["class_1"] for r in rows]  # no threshold: the top class


def test_onnx_and_checkpoint_predict_the_same(ckpt, tmp_path):
    onnx_path = export_onnx(ckpt, str(tmp_path / "model.onnx"))
    files = photo_paths()
    a = predict.main([ckpt, *files, "--no-progress", "--workers", "0"])
    b = predict.main([onnx_path, *files, "--no-progress", "--workers", "0"])
    assert [[t["class"] for t in p["top"]] for p in a["predictions"]] == \
           [[t["class"] for t in p["top"]] for p in b["predictions"]]


def test_topk_is_capped_at_class_count(tmp_path, capsys):
    two = make_checkpoint(str(tmp_path / "two.pt"), ["a", "b"])
    r = predict.main([two, photo_paths()[0], "--topk", "5", "--no-progress"])
    assert len(r["predictions"][0]["top"]) == 2
    assert sum(t["prob"] for t in r["predictions"][0]["top"]) == pytest.approx(1.0, abs=1e-5)
    # one photo: "1 image predicted", and a rate below 10 per second in tenths (not "0 images/s")
    rate = rate_text(r["images_per_s"])
    assert f"two.pt: 1 image predicted in {r['seconds']:.2f} s, {rate} images/s" in capsys.readouterr().out
    assert rate_text(0.34) == "0.3" and rate_text(9.96) == "10" and rate_text(2208.4) == "2208"


def test_nothing_to_predict_errors(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images found in .*empty"):
        predict.main([ckpt, str(tmp_path / "empty"), "--no-progress"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="none of the 1 files could be read as images"):
        predict.main([ckpt, str(bad), "--no-progress", "--csv", str(tmp_path / "p.csv"),
                      "--json", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.json").exists()  # no file of headers alone
    with pytest.raises(UserError, match="--topk must be at least 1"):
        predict.main([ckpt, str(bad), "--topk", "0"])


def test_cli_missing_model_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "predict.py", str(tmp_path / "nope.onnx"), photo_paths()[0]],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: model file {tmp_path / 'nope.onnx'} not found; pass a train.py checkpoint "
                                "(.pt), a TorchScript file, an ONNX file (.onnx), a torch.export file (.pt2), an ExecuTorch program "
                                "(.pte) or a TensorRT engine (.engine) "
                                "written by export.py")
