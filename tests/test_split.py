"""split_dataset.py / utils.data.split: exact, leak-free, reproducible partitions of messy real class folders."""
import csv
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import utils.data.split as split_mod
from utils.data import load_image_folder
from utils.data.split import scan_folder, split_dataset
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample")
PHOTOS = os.path.join(ROOT, "tests", "assets", "photos")
LATIN1 = os.fsdecode(b"caf\xe9 cr\xe8me.png")  # not valid UTF-8: a Latin-1 file name from an old archive


def _png(cls: str, i: int) -> str:
    return os.path.join(SAMPLE, cls, sorted(os.listdir(os.path.join(SAMPLE, cls)))[i])


def _snapshot(folder: str) -> dict:
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def _read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def _report(out: str) -> dict[str, str]:
    return {r["item"]: r["reason"] for r in _read_csv(os.path.join(out, "report.csv"))}


@pytest.fixture
def messy(tmp_path):
    """A raw folder built from real committed images, with every kind of mess the issue lists."""
    raw = tmp_path / "raw"
    for cls in ("Bag", "Coat", "Sandal"):
        shutil.copytree(os.path.join(SAMPLE, cls), raw / cls)
    bag, coat = raw / "Bag", raw / "Coat"
    # broken files
    data = open(_png("Bag", 0), "rb").read()
    (bag / "truncated.png").write_bytes(data[: len(data) // 2])
    jpg = open(os.path.join(PHOTOS, "goldfish.jpg"), "rb").read()
    (bag / "truncated_photo.jpg").write_bytes(jpg[: len(jpg) // 2])
    (bag / "empty.jpg").write_bytes(b"")
    (bag / "notes.txt").write_text("not an image")
    (bag / "fake.png").write_text("text pretending to be a png")
    (bag / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (bag / "._train_00000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (raw / ".hidden_class").mkdir()
    shutil.copy(_png("Coat", 0), raw / ".hidden_class" / "x.png")
    (raw / "stray.png").write_bytes(open(_png("Coat", 1), "rb").read())
    # nested sub-folders, unusual extensions, unusual names, unusual modes
    (coat / "more" / "deeper").mkdir(parents=True)
    Image.open(_png("Coat", 2)).save(coat / "more" / "deeper" / "nested.bmp")
    Image.open(_png("Coat", 3)).convert("RGB").save(coat / "upper.JPG", format="JPEG")
    Image.open(_png("Coat", 4)).convert("RGB").save(coat / "long.jpeg", format="JPEG")
    Image.open(_png("Coat", 5)).save(coat / "modern.webp", format="WEBP", lossless=True)
    Image.open(_png("Coat", 6)).save(coat / "mantel ünïcödé 外套 (1).png")
    shutil.copy(_png("Coat", 10), os.path.join(coat, LATIN1))
    Image.open(_png("Coat", 7)).convert("RGB").convert("CMYK").save(coat / "cmyk.jpg", format="JPEG")
    Image.open(_png("Coat", 8)).convert("P").save(coat / "palette.png")
    Image.open(_png("Coat", 9)).convert("RGBA").save(coat / "rgba.png")
    Image.open(os.path.join(PHOTOS, "ibex.jpg")).convert("L").save(coat / "grey_photo.jpg")
    # a class with one image, duplicates within a class and across classes
    (raw / "Lonely").mkdir()
    shutil.copy(_png("Trouser", 0), raw / "Lonely" / "only.png")
    shutil.copy(_png("Sandal", 0), raw / "Sandal" / "copy_of_first.png")
    shutil.copy(_png("Sandal", 1), raw / "Sandal" / "copy_of_second.png")
    shutil.copy(_png("Bag", 1), coat / "bag_also_labelled_coat.png")
    return raw


def test_messy_folder_is_split_with_every_problem_reported(messy, tmp_path):
    out = tmp_path / "out"
    before = _snapshot(messy)
    result = split_dataset(str(messy), str(out), val=0.2, test=0.1, seed=0)
    assert _snapshot(messy) == before, "the input folder must never change"
    rep = _report(out)
    # each skipped file is reported with its reason
    assert "truncated" in rep["Bag/truncated.png"] or "unreadable" in rep["Bag/truncated.png"]
    assert rep["Bag/truncated_photo.jpg"].startswith("unreadable image")
    assert rep["Bag/empty.jpg"] == "empty file (0 bytes)"
    assert rep["Bag/notes.txt"].startswith("not an image file (extension '.txt'")
    assert rep["Bag/fake.png"].startswith("unreadable image")
    assert rep["Bag/.DS_Store"].startswith("hidden file")
    assert rep["Bag/._train_00000.png"].startswith("hidden file")
    assert rep[".hidden_class"] == "hidden file or folder"
    assert rep["stray.png"] == "file outside any class folder"
    # kept, with notes
    assert "nested sub-folder" in rep["Coat/more/deeper/nested.bmp"]
    assert rep["Coat/cmyk.jpg"] == "colour mode CMYK: converted to RGB when loaded"
    assert rep["Coat/palette.png"] == "colour mode P: converted to RGB when loaded"
    assert rep["Coat/rgba.png"] == "colour mode RGBA: converted to RGB when loaded"
    assert "too few to split" in rep["Lonely"]
    assert "labelling conflict" in rep["Coat/bag_also_labelled_coat.png"]
    assert "labelling conflict" in rep[f"Bag/{os.path.basename(_png('Bag', 1))}"]
    rows = _read_csv(out / "split.csv")
    by_source = {r["source"]: r for r in rows}
    for kept in ("Coat/upper.JPG", "Coat/long.jpeg", "Coat/modern.webp", "Coat/more/deeper/nested.bmp",
                 "Coat/mantel ünïcödé 外套 (1).png", "Coat/" + LATIN1, "Coat/cmyk.jpg", "Coat/palette.png",
                 "Coat/rgba.png",
                 "Coat/grey_photo.jpg", "Lonely/only.png"):
        assert kept in by_source, kept
        assert os.path.isfile(out / by_source[kept]["path"])
    assert by_source["Lonely/only.png"]["split"] == "train"
    assert by_source["Coat/more/deeper/nested.bmp"]["path"].endswith("Coat/more/deeper/nested.bmp")
    # exact partition: every image file that decodes is in split.csv once, nothing else is
    readable = {s for s in _snapshot(messy) if "/" in s and not os.path.basename(s).startswith(".")
                and not s.startswith(".") and s.split("/")[-1] not in
                ("truncated.png", "truncated_photo.jpg", "empty.jpg", "notes.txt", "fake.png")}
    assert sorted(r["source"] for r in rows) == sorted(readable)
    assert len(rows) == len(result.files)
    on_disk = {os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/")
               for d, _, fs in os.walk(out) for f in fs if f not in ("split.csv", "report.csv")}
    assert on_disk == {r["path"] for r in rows}
    # the output is trainable, and every odd mode loads as RGB
    for s in ("train", "val", "test"):
        ds = load_image_folder(str(out / s))
        assert ds.classes == ["Bag", "Coat", "Lonely", "Sandal"]
    odd = [r["path"] for r in rows if r["source"] in ("Coat/cmyk.jpg", "Coat/palette.png", "Coat/rgba.png",
                                                      "Coat/grey_photo.jpg", "Coat/upper.JPG")]
    from utils.data import load_pil_rgb
    assert all(load_pil_rgb(str(out / p)).mode == "RGB" for p in odd)


def test_duplicates_never_cross_splits(messy, tmp_path):
    for seed in range(6):
        out = tmp_path / f"out{seed}"
        split_dataset(str(messy), str(out), val=0.3, test=0.2, seed=seed)
        splits_of_hash: dict[str, set] = {}
        for r in _read_csv(out / "split.csv"):
            splits_of_hash.setdefault(r["sha256"], set()).add(r["split"])
        assert all(len(s) == 1 for s in splits_of_hash.values())
        rows = {r["source"]: r for r in _read_csv(out / "split.csv")}
        assert rows["Sandal/copy_of_first.png"]["split"] == rows[f"Sandal/{os.path.basename(_png('Sandal', 0))}"]["split"]
        assert rows["Coat/bag_also_labelled_coat.png"]["split"] == "train"
        assert rows["Coat/bag_also_labelled_coat.png"]["class"] == "Coat"


def test_split_is_stratified_reproducible_and_listing_order_independent(tmp_path, monkeypatch):
    a = split_dataset(SAMPLE, str(tmp_path / "a"), val=0.2, test=0.1, seed=3)
    b = split_dataset(SAMPLE, str(tmp_path / "b"), val=0.2, test=0.1, seed=3)
    c = split_dataset(SAMPLE, str(tmp_path / "c"), val=0.2, test=0.1, seed=4)
    pick = lambda r: sorted((f.source, f.split) for f in r.files)  # noqa: E731
    assert pick(a) == pick(b) and pick(a) != pick(c)
    for counts in a.counts().values():
        assert (counts["train"], counts["val"], counts["test"]) == (14, 4, 2)
    # reversed directory listings (another filesystem) give the same split
    real_walk, real_scandir = os.walk, os.scandir
    monkeypatch.setattr(split_mod.os, "walk", lambda p, **kw: ((d, ds[::-1], fs[::-1]) for d, ds, fs in real_walk(p, **kw)))
    class Reversed:  # like os.scandir's result: an iterator that is also a context manager
        def __init__(self, entries):
            self.it = iter(entries)

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.it)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(split_mod.os, "scandir", lambda p: Reversed(list(real_scandir(p))[::-1]))
    d = split_dataset(SAMPLE, str(tmp_path / "d"), val=0.2, test=0.1, seed=3)
    assert pick(d) == pick(a)
    monkeypatch.undo()
    # renaming files (same bytes) does not move them between splits: the order is by content
    renamed = tmp_path / "renamed"
    shutil.copytree(SAMPLE, renamed)
    for cls in os.listdir(renamed):
        for f in os.listdir(renamed / cls):
            os.rename(renamed / cls / f, renamed / cls / ("z_" + f[:-4][::-1] + ".png"))
    e = split_dataset(str(renamed), str(tmp_path / "e"), val=0.2, test=0.1, seed=3)
    assert sorted((f.sha256, f.split) for f in e.files) == sorted((f.sha256, f.split) for f in a.files)


def test_every_tool_lists_the_same_files_of_a_folder_with_links(tmp_path):
    """A class folder holding a link to another folder of photos, a link back to itself (a loop) and a hidden
    .ipynb_checkpoints copy: training (ImageFolder), evaluate/predict/export (scan_class_folders) and
    split_dataset read the same images, each once."""
    from utils.data import scan_class_folders

    root = tmp_path / "hand_split"
    extra = tmp_path / "more_coats"
    for cls in ("Bag", "Coat"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            shutil.copy(_png(cls, i), root / cls / f"{i}.png")
    extra.mkdir()
    for i in range(3, 6):
        shutil.copy(_png("Coat", i), extra / f"{i}.png")
    os.symlink(extra, root / "Coat" / "more")
    os.symlink(root / "Coat", root / "Coat" / "loop")
    (root / "Coat" / ".ipynb_checkpoints").mkdir()
    shutil.copy(_png("Coat", 0), root / "Coat" / ".ipynb_checkpoints" / "0-checkpoint.png")

    trained = [(os.path.relpath(p, root), y) for p, y in load_image_folder(str(root)).samples]
    per_class, _ = scan_class_folders(str(root))
    evaluated = [(os.path.relpath(p, root), y) for y, c in enumerate(per_class) for p in per_class[c]]
    assert trained == evaluated
    assert [p for p, _ in trained] == ["Bag/0.png", "Bag/1.png", "Bag/2.png", "Coat/0.png", "Coat/1.png",
                                       "Coat/2.png", "Coat/more/3.png", "Coat/more/4.png", "Coat/more/5.png"]
    scanned = scan_folder(str(root))
    assert sorted(f.source for f in scanned.files) == sorted(p for p, _ in trained)
    assert ("Coat/loop/", "link to its class folder or a folder above it (a loop): not read") in scanned.skipped
    # a link at the top of RAW to RAW itself is no class: it would file every image twice and leave no val/test
    os.symlink(".", root / "all")
    scanned = scan_folder(str(root))
    assert scanned.classes == ["Bag", "Coat"] and len(scanned.files) == len(trained)
    assert ("all/", f"link to {root} itself or a folder above it (a loop): not read") in scanned.skipped


def test_class_whose_every_image_is_also_in_another_class_says_so(tmp_path):
    """A class whose images are all copies of another class's is not 'only 0 distinct images': they are labelling
    conflicts, kept in train, and the note says so."""
    root = tmp_path / "raw"
    for cls in ("Bag", "Coat"):
        (root / cls).mkdir(parents=True)
    for i in range(4):
        shutil.copy(_png("Bag", i), root / "Bag" / f"{i}.png")
        shutil.copy(_png("Bag", i), root / "Coat" / f"copy{i}.png")
        shutil.copy(_png("Coat", i), root / "Coat" / f"{i}.png")
    old = os.umask(0o022)
    try:
        result = split_dataset(str(root), str(tmp_path / "out"), val=0.25, seed=0)
    finally:
        os.umask(old)
    # the folder is built under a private temporary name, then renamed: it must not stay private (0700)
    assert oct(os.stat(tmp_path / "out").st_mode & 0o777) == oct(0o755)
    notes = dict(result.notes)
    assert notes["Bag"] == ("only 0 distinct image(s) besides 4 also filed under another class (in train, see their "
                            "notes): too few to split, all kept in train")
    assert "Coat" not in notes  # 4 distinct images of its own besides the copies: split as usual
    assert sorted(f.split for f in result.files if f.cls == "Coat" and not f.source.startswith("Coat/copy")) == \
        ["train"] * 3 + ["val"]


def test_refuses_nonempty_out_and_never_leaves_half_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        split_dataset(SAMPLE, str(out))
    assert (out / "keep.txt").read_text() == "precious"
    # a crash in the middle leaves the old OUT untouched and no temporary folder behind
    calls = {"n": 0}
    real_place = split_mod._place

    def failing_place(src, dst, mode):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return real_place(src, dst, mode)

    monkeypatch.setattr(split_mod, "_place", failing_place)
    with pytest.raises(KeyboardInterrupt):
        split_dataset(SAMPLE, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        split_dataset(SAMPLE, str(tmp_path / "fresh"))
    assert sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.undo()
    split_dataset(SAMPLE, str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "split.csv").is_file()
    with pytest.raises(UserError, match="overlap"):
        split_dataset(SAMPLE, os.path.join(SAMPLE, "Bag", "out"))
    one = tmp_path / "one_class"
    shutil.copytree(os.path.join(SAMPLE, "Bag"), one / "Bag")
    with pytest.raises(UserError, match="found 1 class folder.*at least 2"):
        split_dataset(str(one), str(tmp_path / "x"))
    with pytest.raises(UserError, match="--val"):
        split_dataset(SAMPLE, str(tmp_path / "y"), val=0.7, test=0.4)


@pytest.mark.parametrize("mode", ["symlink", "hardlink"])
def test_link_modes(tmp_path, mode):
    out = tmp_path / mode
    split_dataset(SAMPLE, str(out), val=0.25, mode=mode)
    rows = _read_csv(out / "split.csv")
    assert len(rows) == 200
    p = out / rows[0]["path"]
    src = os.path.join(SAMPLE, rows[0]["source"])
    if mode == "symlink":
        assert os.path.islink(p) and os.path.realpath(p) == os.path.realpath(src)
    else:
        assert os.stat(p).st_ino == os.stat(src).st_ino
    assert hashlib.sha256(open(p, "rb").read()).hexdigest() == rows[0]["sha256"]


def test_cli_table_and_error(tmp_path, capsys):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "split_dataset.py", SAMPLE, str(out), "--val", "0.25", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| Bag         |     15 |      5 |     20 |" in r.stdout
    assert "| total       |    150 |     50 |    200 |" in r.stdout
    r = subprocess.run([sys.executable, "split_dataset.py", SAMPLE, str(out)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--overwrite" in r.stderr
    assert len(scan_folder(SAMPLE).files) == 200
    import split_dataset
    split_dataset.main([SAMPLE, str(tmp_path / "noval"), "--val", "0", "--quiet"])  # allowed, but train.py needs val/
    assert not (tmp_path / "noval" / "val").exists()
    assert "note: no val/ split (--val 0); train.py needs one to choose best.pt and report accuracy: split again " \
           "with --val 0.2 before training on this folder" in capsys.readouterr().out


def test_split_dataset_starts_without_torch():
    """split_dataset.py needs no tensors: importing torch cost it ~5 s of start-up (utils.data loads its sub-modules
    on first use; the imbalance decision lives in torch-free utils/imbalance.py)."""
    code = "import sys, split_dataset; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision'}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
