#!/usr/bin/env bash
# The whole pipeline on the built-in real dataset (Fashion-MNIST), from a fresh clone:
# set up .venv -> prepare class folders -> split -> train -> evaluate -> export -> predict.
# Extra arguments go to train.py, e.g.  bash scripts/demo.sh --epochs 2
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/default}
DATA=datasets/fashion_mnist
PY=.venv/bin/python
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "setup"
bash scripts/setup.sh

step "prepare: Fashion-MNIST -> $DATA/raw/<class>/*.png (70,000 real images)"
$PY -m datasets.fashion_mnist.prepare --out "$DATA/raw"

step "split: $DATA/raw -> $DATA/split/{train,val} (stratified, seed 0)"
if [ -f "$DATA/split/split.csv" ]; then
  echo "$DATA/split already exists (delete it to split again)"
else
  $PY split_dataset.py "$DATA/raw" "$DATA/split" --val 0.142857 --seed 0 --mode hardlink
fi

step "train: configs/default.yaml -> $RUN"
$PY train.py --config configs/default.yaml --data "$DATA/split" --out "$RUN" --overwrite "$@"  # a re-run starts afresh

step "evaluate: $RUN/best.pt on $DATA/split/val -> $RUN/eval"
$PY evaluate.py "$RUN/best.pt" "$DATA/split/val" --out "$RUN/eval"

# The int8 file if export.py wrote it, else the fp32 ONNX file (an int8 file refused by its accuracy check).
pick_model() { if [ -f "$1/model.int8.onnx" ]; then echo "$1/model.int8.onnx"; else echo "$1/model.onnx"; fi; }

# The phone files (ExecuTorch .pte) when ExecuTorch installed on this platform (scripts/setup.sh goes on without it).
PHONE=""; if $PY -c "import executorch" 2>/dev/null; then PHONE="executorch_int8"; fi
step "export: ONNX, TorchScript, .pt2, int8 ONNX${PHONE:+, ExecuTorch .pte fp32 + int8} -> $RUN/export"
# --int8-fallback: a refused int8 file is one line of output, then the demo goes on with fp32 model.onnx.
$PY export.py "$RUN/best.pt" --format onnx torchscript pt2 int8 $PHONE --int8-fallback --out "$RUN/export"
MODEL=$(pick_model "$RUN/export")

step "predict: $(basename "$MODEL") on a few validation images"
$PY predict.py "$MODEL" $(find "$DATA/split/val" -name '*.png' | sort | awk 'NR % 1000 == 1' | head -10) --topk 3 \
  --threshold auto

step "done in $(( $(date +%s) - t0 ))s. Artefacts:"
cat <<EOT
  data         $DATA/raw (class folders), $DATA/split/{train,val}, $DATA/split/split.csv
  run          $RUN/{config.yaml,log.csv,curves.png,last.pt,best.pt}
  evaluation   $RUN/eval/{report.html,metrics.json,per_class.csv,confusion_matrix.png,mistakes.png,reliability.png,coverage.png,...}
  deployment   $RUN/export/{model.onnx,model.torchscript.pt,model.pt2,model.int8.onnx (if it passed its check),
               model.pte + model.int8.pte (with ExecuTorch),export.json}
EOT
