"""Metric functions against values computed by hand on fixed label vectors."""
import numpy as np
import pytest
import torch

from utils.metrics import (
    class_summary,
    confusion_matrix,
    macro_average,
    per_class_from_confusion,
    per_class_report,
    row_normalize,
    standard_errors,
    topk_correct,
)

# 9 samples, classes 0..2. True/pred pairs: (0,0) (0,0) (0,1) (0,2) (1,1) (1,1) (1,0) (2,2) (2,2)
TARGET = [0, 0, 0, 0, 1, 1, 1, 2, 2]
PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2]


def test_confusion_matrix_hand_counted():
    cm = confusion_matrix(TARGET, PRED, labels=[0, 1, 2])
    assert cm.tolist() == [[2, 1, 1], [1, 2, 0], [0, 0, 2]]
    assert cm.dtype == np.int64


def test_confusion_matrix_label_subset_and_order():
    # Only classes 2 and 0, in that order: samples of other classes are left out.
    cm = confusion_matrix(TARGET, PRED, labels=[2, 0])
    assert cm.tolist() == [[2, 0], [1, 2]]


def test_confusion_matrix_of_a_single_class_val_split_warns_nothing():
    """A val split holding one class: scikit-learn's confusion_matrix warned twice inside evaluate.py."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = confusion_matrix(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1]), labels=[0, 1, 2])
    assert cm.tolist() == [[0, 0, 0], [0, 3, 0], [0, 0, 0]]


def test_row_normalize_recall_view_and_empty_rows():
    cm = np.array([[2, 1, 1], [0, 0, 0], [0, 0, 2]])
    assert row_normalize(cm).tolist() == [[0.5, 0.25, 0.25], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_per_class_precision_recall_f1_support_by_hand():
    rows = per_class_report(TARGET, PRED, labels=[0, 1, 2], names=["cat", "dog", "fox"])
    # precision = diag / column sum, recall = diag / row sum, F1 = 2PR/(P+R)
    expected = {
        "cat": (2 / 3, 2 / 4, 4 / 7, 4),
        "dog": (2 / 3, 2 / 3, 2 / 3, 3),
        "fox": (2 / 3, 2 / 2, 0.8, 2),
    }
    assert [r["class"] for r in rows] == ["cat", "dog", "fox"]
    for r in rows:
        p, rec, f1, s = expected[r["class"]]
        assert r["precision"] == pytest.approx(p)
        assert r["recall"] == pytest.approx(rec)
        assert r["f1"] == pytest.approx(f1)
        assert r["support"] == s


def test_predicted_only_class_gets_zero_support_and_precision():
    # Class 3 never occurs but is predicted once: precision 0, support 0, no division warning.
    rows = per_class_report([0, 0, 1], [0, 3, 1], labels=[0, 1, 3], names=["a", "b", "c", "d"])
    d = rows[2]
    assert (d["class"], d["precision"], d["recall"], d["f1"], d["support"]) == ("d", 0.0, 0.0, 0.0, 0)
    # Macro average counts only classes with samples: a (P=1, R=.5) and b (P=1, R=1).
    macro = macro_average(rows)
    assert macro["precision"] == pytest.approx(1.0)
    assert macro["recall"] == pytest.approx(0.75)
    assert macro["f1"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    # sample 0: top-1 hit; sample 1: target ranked 2nd (tie broken) or 3rd; sample 2: target ranked 3rd
    assert topk_correct(logits, target, ks=(1, 3)) == [1, 3]
    assert topk_correct(logits, target, ks=(1, 5)) == [1, 3]  # k capped at the class count


def test_balanced_accuracy_and_macro_f1_by_hand_and_against_sklearn():
    cm = confusion_matrix(TARGET, PRED, labels=[0, 1, 2])  # [[2, 1, 1], [1, 2, 0], [0, 0, 2]]
    s = class_summary(cm)
    # recalls 2/4, 2/3, 2/2; F1s 4/7, 2/3, 0.8 (see above)
    assert s["balanced_acc"] == pytest.approx(100 * (2 / 4 + 2 / 3 + 1) / 3)
    assert s["macro_f1"] == pytest.approx((4 / 7 + 2 / 3 + 0.8) / 3)
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, t, rng.integers(0, 5, 300))
    s = class_summary(confusion_matrix(t, p, labels=range(5)))
    assert s["balanced_acc"] == pytest.approx(100 * balanced_accuracy_score(t, p))
    assert s["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"))


def test_class_summary_skips_classes_without_samples():
    # class 2 never occurs (only predicted once): it does not count as a zero recall / F1
    cm = np.array([[3, 0, 1], [1, 1, 0], [0, 0, 0]])
    prec, rec, f1, support = per_class_from_confusion(cm)
    assert support.tolist() == [4, 2, 0] and rec.tolist() == [0.75, 0.5, 0.0]
    assert prec.tolist() == [0.75, 1.0, 0.0]
    assert class_summary(cm)["balanced_acc"] == pytest.approx(62.5)
    assert class_summary(cm)["macro_f1"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert class_summary(np.zeros((3, 3))) == {"balanced_acc": 0.0, "macro_f1": 0.0}


def test_standard_errors_by_hand_and_by_simulation():
    cm = np.array([[3, 0, 1], [1, 1, 0], [0, 0, 0]])  # recalls 3/4 (n 4), 1/2 (n 2); class 2 absent
    se = standard_errors(cm)  # rates taken as (hits + 1) / (n + 2): 5/8 overall, 4/6 and 2/4 per class
    assert se["top1"] == pytest.approx(100 * np.sqrt(5 / 8 * 3 / 8 / 6))
    assert se["balanced_acc"] == pytest.approx(100 * np.sqrt(4 / 6 * 2 / 6 / 4 + 0.5 * 0.5 / 2) / 2)
    assert standard_errors(np.diag([4, 4]))["balanced_acc"] > 5  # 100% on 4 images each is not certain
    assert standard_errors(np.zeros((3, 3))) == {"top1": 0.0, "balanced_acc": 0.0}
    # a val split shaped like an imbalanced inspection folder: the spread of balanced accuracy over repeated
    # val draws (each class's hits binomial) matches the formula
    n, r = np.array([377, 179, 74, 27]), np.array([0.94, 0.83, 0.86, 0.33])
    hits = np.random.default_rng(0).binomial(n, r, size=(20000, 4))
    spread = 100 * (hits / n).mean(axis=1).std()
    cm = np.diag(n * r) + np.fliplr(np.diag(n * (1 - r)))  # misses of class c predicted as class 3 - c
    assert standard_errors(cm)["balanced_acc"] == pytest.approx(spread, rel=0.03)
    assert 2.3 < spread < 2.6  # the 27-image class dominates: +-2.4 points
