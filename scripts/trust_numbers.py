"""Measure the docs/trust.md numbers for a trained run: calibration, reject option, OOD photos, TTA.

    python scripts/trust_numbers.py runs/default/best.pt datasets/fashion_mnist/split/val PHOTOS_DIR --out /tmp/trust

The val folder is split into two stratified halves (every other file of each class): temperature and threshold
are fitted on half A and every number is measured on half B, which they never saw. PHOTOS_DIR holds
out-of-distribution photos (e.g. ai_benchmark/data/classification from the ai-benchmark wheel).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import evaluate  # noqa: E402
import predict  # noqa: E402
from utils.data import scan_class_folders  # noqa: E402
from utils.deploy.inference import expand_image_args
from utils.deploy.runtime import open_model  # noqa: E402
from utils.trust.calibration import fit_calibration, write_calibration_to_checkpoint  # noqa: E402
from utils.trust.reject import DEFAULT_TARGET_ACCURACY, threshold_for_accuracy  # noqa: E402
from utils.trust.uncertainty import paired_difference  # noqa: E402


def halves(val: str, out: str) -> tuple[str, str]:
    """Symlinked stratified halves out/valA, out/valB of ``val``."""
    per_class, _ = scan_class_folders(val)
    for c, files in per_class.items():
        for part, chosen in (("valA", files[0::2]), ("valB", files[1::2])):
            os.makedirs(os.path.join(out, part, c), exist_ok=True)
            for f in chosen:
                dst = os.path.join(out, part, c, os.path.basename(f))
                if not os.path.lexists(dst):
                    os.symlink(os.path.abspath(f), dst)
    return os.path.join(out, "valA"), os.path.join(out, "valB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("val")
    p.add_argument("photos")
    p.add_argument("--out", default="/tmp/trust")
    p.add_argument("--target-accuracy", type=float, default=DEFAULT_TARGET_ACCURACY)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "best.pt")
    shutil.copy(args.checkpoint, ckpt)
    val_a, val_b = halves(args.val, args.out)
    kw = dict(workers=args.workers, progress=False, target_accuracy=args.target_accuracy)

    # Fit on A (temperature, threshold on calibrated confidence; also a threshold on the plain softmax)
    model = open_model(ckpt, device="cpu")
    ra = evaluate.evaluate(model, val_a, calibration="none", **kw)
    entry = fit_calibration(ra["logits"], ra["target"], args.target_accuracy, fitted_on=val_a)
    write_calibration_to_checkpoint(ckpt, entry)
    raw_conf, raw_pred = ra["logits"].softmax(1).max(1)
    raw_thr = threshold_for_accuracy(raw_conf, raw_pred == ra["target"], args.target_accuracy)["threshold"]

    # Measure on B
    model = open_model(ckpt, device="cpu")
    rb = evaluate.evaluate(model, val_b, **kw)
    evaluate.write_outputs(rb, os.path.join(args.out, "eval_valB"))
    m = rb["metrics"]
    conf_raw_b, pred_b = rb["logits"].softmax(1).max(1)
    acc_raw_b = (pred_b == rb["target"])[conf_raw_b >= raw_thr]
    rt = evaluate.evaluate(model, val_b, tta=True, **kw)
    tta_diff = paired_difference(rb["target"].tolist(), rt["logits"].argmax(1).tolist(),
                                 rb["logits"].argmax(1).tolist(), rb["labels"])
    # OOD photos
    photos, _ = expand_image_args([args.photos])
    ood = {}
    for name, temp, thr in (("softmax, threshold fitted on softmax", 1.0, raw_thr),
                            ("calibrated, stored threshold", entry["temperature"], entry["threshold"])):
        res = predict.predict_files(model, photos, topk=1, workers=0, progress=False, temperature=temp, threshold=thr)
        ood[name] = {"unknown": sum(p["answer"] == "unknown" for p in res["predictions"]),
                     "n": len(res["predictions"]), "threshold": thr,
                     "mean_top1_prob": sum(p["top"][0]["prob"] for p in res["predictions"]) / len(res["predictions"])}
    report = {
        "fitted_on_A": entry, "raw_softmax_threshold_A": raw_thr,
        "B": {"images": m["images"], "top1": m["top1"], "top1_ci": m["intervals"]["top1"]["ci"],
              "balanced_acc_ci": m["intervals"]["balanced_acc"]["ci"], "macro_f1": m["intervals"]["macro_f1"],
              "ece_before": m["calibration"]["ece_before"], "ece_after": m["calibration"]["ece_after"],
              "stored_threshold_on_B": m["reject"]["stored"], "fitted_on_B": m["reject"]["fitted_here"],
              "raw_threshold_on_B": {"coverage": len(acc_raw_b) / len(pred_b),
                                     "accuracy": float(acc_raw_b.float().mean()) if len(acc_raw_b) else None}},
        "ood": ood,
        "tta": {"top1": rt["metrics"]["top1"], "diff_vs_plain": tta_diff,
                "seconds_plain": m["seconds"], "seconds_tta": rt["metrics"]["seconds"],
                "model_images_per_s_plain": m["model_images_per_s"],
                "model_images_per_s_tta": rt["metrics"]["model_images_per_s"],
                "ece_after_tta": rt["metrics"]["calibration"]["ece_after"]},
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
    }
    text = json.dumps(report, indent=2, default=float)
    with open(os.path.join(args.out, "trust_numbers.json"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
