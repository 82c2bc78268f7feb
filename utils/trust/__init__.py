"""Predictions you can trust, for evaluate.py and predict.py: temperature scaling and ECE (calibration),
Wilson and MOVER intervals and paired differences (uncertainty), the coverage curve and reject threshold (reject),
flip test-time augmentation (tta), report.html (report), and the glue that prints and writes them (summary)."""
