"""utils.plots: curves from log.csv (function and command), confusion-matrix and mistakes figures."""
import os
import subprocess
import sys

import numpy as np
import pytest
from eval_helpers import photo_paths
from PIL import Image

from utils.errors import UserError
from utils.plots import LOG_COLUMNS, plot_confusion_matrix, plot_curves, plot_mistakes, read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(LOG_COLUMNS) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    a = write_log(tmp_path / "baseline" / "log.csv", [
        (1, 0.1, 2.1, 31.0, 1.9, 40.0, 81.0, 12.0, 500.0),
        (2, 0.05, 1.4, 52.5, 1.3, 58.0, 90.0, 11.5, 520.0),
        (3, 0.0, 1.0, 68.0, 1.1, 63.5, 93.0, 11.7, 515.0)])
    b = write_log(tmp_path / "strong_aug" / "log.csv", [
        (1, 0.1, 2.3, 25.0, 2.0, 35.0, 80.0, 13.0, 480.0),
        (2, 0.0, 1.8, 41.0, "", "", "", 13.1, 470.0)])  # a val pass that did not run
    return a, b


def test_read_log_parses_every_column(two_runs):
    log = read_log(two_runs[0])
    assert log["epoch"] == [1.0, 2.0, 3.0]
    assert log["train_acc"] == [31.0, 52.5, 68.0]
    assert log["val_top1"] == [40.0, 58.0, 63.5]
    b = read_log(os.path.dirname(two_runs[1]))  # a run folder works too
    assert b["train_loss"] == [2.3, 1.8] and np.isnan(b["val_loss"][1])


def test_plot_curves_several_runs(two_runs, tmp_path):
    out = str(tmp_path / "cmp" / "curves.png")
    plot_curves(list(two_runs), out, labels=["base", "aug"])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 300
        # something was drawn in colour (the run lines), not a blank canvas
        assert len(im.convert("RGB").getcolors(1 << 20)) > 50
    assert not [f for f in os.listdir(tmp_path / "cmp") if f.endswith(".tmp")]


def test_plot_curves_errors(two_runs, tmp_path):
    with pytest.raises(UserError, match=r"log file .*nope\.csv not found"):
        plot_curves([str(tmp_path / "nope.csv")], str(tmp_path / "x.png"))
    with pytest.raises(UserError, match="1 labels for 2 log files"):
        plot_curves(list(two_runs), str(tmp_path / "x.png"), labels=["only-one"])
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n1,2.0\n")
    with pytest.raises(UserError, match=r"bad\.csv is not a train\.py log\.csv \(missing columns: epoch, train_loss, val_loss\)"):
        plot_curves([str(bad)], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_command_line(two_runs, tmp_path):
    out = tmp_path / "c.png"
    r = subprocess.run([sys.executable, "plot.py", *two_runs, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (2 runs)" in r.stdout
    assert Image.open(out).format == "PNG"
    r = subprocess.run([sys.executable, "plot.py", str(tmp_path / "none.csv")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: log file")


def test_confusion_matrix_and_mistakes_figures(tmp_path):
    cm = np.array([[5, 1], [2, 7]])
    plot_confusion_matrix(cm, ["cat", "dog"], str(tmp_path / "cm.png"), title="t")
    plot_confusion_matrix(np.diag([3, 4, 5, 6, 7]), list("abcde"), str(tmp_path / "cm5.png"))
    with Image.open(tmp_path / "cm.png") as two, Image.open(tmp_path / "cm5.png") as five:
        assert two.format == five.format == "PNG" and two.tobytes() != five.tobytes()
        # counts and row-normalised cells are drawn in a colour scale, not a blank canvas
        assert len(two.convert("RGB").getcolors(1 << 20)) > 50 and len(five.convert("RGB").getcolors(1 << 20)) > 50
    photos = photo_paths()[:3]
    mistakes = [{"file": p, "true": "a", "predicted": "b", "confidence": 0.9 - i / 10} for i, p in enumerate(photos)]
    plot_mistakes(mistakes, str(tmp_path / "m.png"), max_images=2)
    plot_mistakes([], str(tmp_path / "none.png"))
    with Image.open(tmp_path / "m.png") as a, Image.open(tmp_path / "none.png") as b:
        assert a.width > b.width  # a grid of 2 photos vs. the 'no mistakes' note


def test_plot_curves_draws_balanced_accuracy_only_where_it_differs(tmp_path, monkeypatch):
    """best.pt is chosen by val balanced accuracy on an imbalanced val split: the curve shows it there; on a
    balanced split it equals top-1 and would only hide that line."""
    import utils.plots as plots

    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_top1", "val_bal_acc"]
    logs = {"imb": [(1, 2.0, 30.0, 1.9, 60.0, 41.0), (2, 1.5, 50.0, 1.4, 70.0, 55.5)],
            "bal": [(1, 2.0, 30.0, 1.9, 60.0, 60.0), (2, 1.5, 50.0, 1.4, 70.0, 70.0)]}
    paths = []
    for name, rows in logs.items():
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "log.csv", "w") as f:
            f.write(",".join(cols) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
        paths.append(str(tmp_path / name / "log.csv"))
    drawn = {}
    monkeypatch.setattr(plots, "_save_figure", lambda fig, out: drawn.update(
        lines=[(ln.get_label(), list(ln.get_ydata())) for ax in fig.axes for ln in ax.get_lines()]))
    plot_curves(paths, str(tmp_path / "c.png"))
    labels = dict(drawn["lines"])
    assert labels["imb val balanced acc"] == [41.0, 55.5]
    assert "bal val balanced acc" not in labels and labels["bal val top-1"] == [60.0, 70.0]
