#!/usr/bin/env bash
# One command that measures everything GPU for maxq in at most 9 minutes on one H100 (issue 10).
#
#   bash scripts/gpu_check.sh OUT_DIR [--data-dir DIR] [--dry-run]
#
# Stages, each under its own timeout (budgets in seconds), each writing JSON into OUT_DIR (and its output to
# OUT_DIR/<stage>.log); a failed, skipped or timed-out stage does not stop the next one:
#   0 env           15  card, driver, torch / CUDA / cuDNN versions, optional packages, data         env.json
#   1 correctness   80  pytest -m gpu tests/gpu (without pytest: the same checks via scripts/gpu_check.py): CUDA
#                       masks = CPU masks on every distinct ResNet-50 layer shape (maxq mid-ramp and after, srste,
#                       oneshot), bf16 + channels_last training, compiled = eager (one graph), no host sync in a
#                       training step, accelerate_                                              correctness.json
#   2 train_cost   125  benchmarks/train_cost.py: ResNet-50 224x224 batch 128, CIFAR ResNet-18 32x32 batch 256;
#                       dense, srste, maxq after the ramp and mid-ramp, eager; torch.compile for dense and maxq only
#                       (the sparse variants share one compiled graph; a ResNet-50 compile may take a minute); a
#                       compile that would overrun the budget is skipped and says so            train_cost.json
#   3 accelerate    40  benchmarks/accelerate.py: 2:4 semi-structured kernels, ViT-B/16 and ResNet-50  accelerate.json
#   4 study        150  benchmarks/study.py --config configs/study_gpu.yaml: resnet18_cifar on Fashion-MNIST 32x32,
#                       srste vs maxq, 1:16 then 2:4, two seeds, 4 trainings sharing the GPU; no run starts that
#                       would not end by second 115                study.json, results/gpu/*.json (the records)
#   5 fsdp          60  scripts/gpu_fsdp_check.py (torchrun, 1 GPU): Lightning ModelParallelStrategy (FSDP2) and the
#                       HF Trainer with accelerate's FSDP2 (a tiny Llama; a tiny GPT-2 sharded Shard(1) by hand),
#                       each with maxq's callback: folded full state dict exactly N:M, saved, a checkpoint resumed
#                       to the same weights                                                        fsdp.json
#   6 memory        45  benchmarks/memory.py --device cuda --in-process: torch.cuda.max_memory_allocated per method
#                       (dense, oneshot, srste, maxq) on linear8, ResNet-50, GPT-2 at fp32 and bf16   memory.json
# Total of the budgets: 515 s, plus about 10 s of bookkeeping (a stage that ignores SIGTERM is killed 5 s after
# its budget). OUT_DIR/summary.md (the card, versions, a table per stage) is rewritten after every stage, so a run
# cut short still has one. Exit status 0 only if every stage passed (or was skipped for a missing package).
#
# The machine needs Python >= 3.10 with torch and torchvision; pytest, pyyaml, tqdm and matplotlib are optional
# (a stage that needs a missing package is marked "skipped: no X"). Nothing is installed and no network is used:
# the package runs from this tree (PYTHONPATH=src). PY=/path/to/python picks the interpreter (default: the first
# of python, python3 that has torch).
#
# Data (stage 4): the four Fashion-MNIST .gz files (30 MB) in --data-dir, default data/fashion-mnist (git-ignored):
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
# With the device tool: carry ["data/fashion-mnist"] and the command   bash scripts/gpu_check.sh "$OUT/gpu_check"
# Afterwards copy OUT_DIR/results/gpu/*.json into results/gpu/ and the tables into docs/RESULTS.md section 4.
#
# --dry-run: every stage on the CPU with tiny sizes (small models, a step or two, one tiny study run; fsdp runs
# Lightning's strategy on gloo and marks the HF Trainer runs "skipped: needs CUDA"), about two minutes;
# tests/test_gpu_check.py runs it in `make test`, so that on the GPU only the hardware is new.
set -u

usage() {
    echo "usage: bash scripts/gpu_check.sh OUT_DIR [--data-dir DIR] [--dry-run]" >&2
    exit 2
}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ORIGINAL_ARGS="$*"
OUT="" DATA="" DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --data-dir) [ $# -ge 2 ] || usage; DATA=$2; shift ;;
        --data-dir=*) DATA=${1#*=} ;;
        -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$1 ;;
    esac
    shift
done
[ -n "$OUT" ] || usage
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
[ -n "$DATA" ] && [ -d "$DATA" ] && DATA=$(cd "$DATA" && pwd) # relative to where the command was given
cd "$ROOT" || exit 2

# Python: the first that has torch (found without importing it: that takes seconds).
if [ -z "${PY:-}" ]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
            PY=$candidate
            break
        fi
    done
fi
if [ -z "${PY:-}" ]; then
    echo "gpu_check: no python with torch found (set PY=/path/to/python)" >&2
    exit 2
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export MAXQ_CPU_KERNELS=0 # CUDA tensors never use the fused CPU kernels: do not spend 30 s building them

FMNIST=/usr/share/datasets/fashion-mnist
if [ -z "$DATA" ]; then
    DATA=data/fashion-mnist
    [ -f "$DATA/train-images-idx3-ubyte.gz" ] || [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] || DATA=$FMNIST
fi

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    B_ENV=20 B_CORRECTNESS=60 B_TRAIN_COST=50 B_ACCELERATE=40 B_STUDY=60 B_FSDP=60 B_MEMORY=40 # caps, loaded CPU
else
    DEVICE=cuda
    B_ENV=15 B_CORRECTNESS=80 B_TRAIN_COST=125 B_ACCELERATE=40 B_STUDY=150 B_FSDP=60 B_MEMORY=45
fi

rm -f "$OUT/stages.tsv" "$OUT/correctness.jsonl" "$OUT"/{env,correctness,train_cost,accelerate,study,fsdp,memory}.json
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
"$PY" -c '
import json, sys
out, dry, started, command, commit, python, data, budgets = sys.argv[1:9]
names = ["env", "correctness", "train_cost", "accelerate", "study", "fsdp", "memory"]
record = {"dry_run": dry == "1", "started": started, "command": command, "commit": commit, "python": python,
          "data_dir": data, "budgets": dict(zip(names, map(int, budgets.split())))}
json.dump(record, open(out, "w"), indent=1)
' "$OUT/run.json" "$DRY" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "bash scripts/gpu_check.sh $ORIGINAL_ARGS" "$COMMIT" \
    "$PY" "$DATA" "$B_ENV $B_CORRECTNESS $B_TRAIN_COST $B_ACCELERATE $B_STUDY $B_FSDP $B_MEMORY"

# finalize [--final]: stage JSON and summary.md. Exit 0: every stage passed or was skipped; 4: some did not.
finalize() {
    "$PY" scripts/gpu_check.py finalize "$OUT" "$@" >>"$OUT/finalize.log" 2>&1
    local rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 4 ]; then
        { # the Python summary failed: the stage table at least
            echo "# maxq GPU check (fallback summary: scripts/gpu_check.py finalize failed, see finalize.log)"
            echo
            echo "| stage | exit | wall s | budget s |"
            echo "|---|---|---|---|"
            sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$OUT/stages.tsv" 2>/dev/null
        } >"$OUT/summary.md"
    fi
    return "$rc"
}

# stage NAME BUDGET COMMAND...: run under `timeout`, record exit code, wall time and budget, update the summary.
stage() {
    local name=$1 budget=$2
    shift 2
    echo "== $name (budget ${budget} s): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -s TERM -k 5 "$budget" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')" "$budget" \
        >>"$OUT/stages.tsv"
    echo "   exit $rc"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
    finalize || true
}

# skip_unless NAME BUDGET MODULE...: true if the stage can run; else it is recorded as skipped (with the reason).
skip_unless() {
    local name=$1 budget=$2
    shift 2
    if "$PY" scripts/gpu_check.py require "$OUT" "$name" "$@" >>"$OUT/$name.log" 2>&1; then
        return 0
    fi
    printf '%s\tskip\t0\t%s\n' "$name" "$budget" >>"$OUT/stages.tsv"
    echo "== $name: skipped ($(tail -n 1 "$OUT/$name.log"))"
    finalize || true
    return 1
}

NEEDS_CUDA=()
[ "$DRY" = 1 ] || NEEDS_CUDA=(cuda)

# 0. Environment
DRY_FLAG=()
[ "$DRY" = 1 ] && DRY_FLAG=(--dry-run)
stage env "$B_ENV" "$PY" scripts/gpu_check.py env "$OUT" --device "$DEVICE" --data-dir "$DATA" \
    ${DRY_FLAG[@]+"${DRY_FLAG[@]}"}

# 1. Correctness: pytest -m gpu where pytest exists, else the same checks through the built-in runner.
CHECK_ENV=(MAXQ_TEST_RESULTS="$OUT/correctness.jsonl")
[ "$DRY" = 1 ] && CHECK_ENV+=(MAXQ_TEST_DEVICE=cpu MAXQ_COMPILE_BACKEND=aot_eager)
if skip_unless correctness "$B_CORRECTNESS" torch torchvision ${NEEDS_CUDA[@]+"${NEEDS_CUDA[@]}"}; then
    if "$PY" -c "import pytest" >/dev/null 2>&1; then
        stage correctness "$B_CORRECTNESS" env "${CHECK_ENV[@]}" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
            tests/gpu tests/deploy/test_accelerate.py
    else
        stage correctness "$B_CORRECTNESS" env "${CHECK_ENV[@]}" "$PY" scripts/gpu_check.py checks \
            "$OUT/correctness.jsonl"
    fi
fi

# 2. Training cost
if skip_unless train_cost "$B_TRAIN_COST" torch torchvision ${NEEDS_CUDA[@]+"${NEEDS_CUDA[@]}"}; then
    if [ "$DRY" = 1 ]; then
        stage train_cost "$B_TRAIN_COST" "$PY" benchmarks/train_cost.py --device cpu --threads 1 \
            --models cnn_small:16:2 --rounds 1 --steps 1 --warmup 1 --compile-backend aot_eager \
            --budget-s $((B_TRAIN_COST - 10)) --out "$OUT/train_cost.json"
    else
        stage train_cost "$B_TRAIN_COST" "$PY" benchmarks/train_cost.py --device cuda \
            --models resnet50:224:128 resnet18_cifar:32:256 --compile-variants dense maxq \
            --rounds 4 --steps 3 --warmup 2 --budget-s $((B_TRAIN_COST - 20)) --out "$OUT/train_cost.json"
    fi
fi

# 3. 2:4 acceleration
if skip_unless accelerate "$B_ACCELERATE" torch torchvision ${NEEDS_CUDA[@]+"${NEEDS_CUDA[@]}"}; then
    if [ "$DRY" = 1 ]; then
        stage accelerate "$B_ACCELERATE" "$PY" benchmarks/accelerate.py --dry-run --models resnet50 \
            --batch-size 1 --image-size 32 --out "$OUT/accelerate.json"
    else
        stage accelerate "$B_ACCELERATE" "$PY" benchmarks/accelerate.py --out "$OUT/accelerate.json"
    fi
fi

# 4. Accuracy study: records into OUT_DIR/results/gpu (they travel back), run folders (checkpoints) outside OUT_DIR.
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
    "$PY" -c "import json, sys; json.dump({'status': 'skipped', 'reason': sys.argv[1]}, open(sys.argv[2], 'w'))" \
        "no Fashion-MNIST in $DATA (copy the four .gz files there)" "$OUT/study.json"
    printf '%s\tskip\t0\t%s\n' study "$B_STUDY" >>"$OUT/stages.tsv"
    echo "== study: skipped (no Fashion-MNIST in $DATA)"
elif skip_unless study "$B_STUDY" torch torchvision yaml tqdm numpy ${NEEDS_CUDA[@]+"${NEEDS_CUDA[@]}"}; then
    RUNS_DIR="$ROOT/runs/gpu_check_study" # large (checkpoints): kept out of OUT_DIR
    [ "$DRY" = 1 ] && RUNS_DIR="$OUT/study_runs"
    rm -rf "$RUNS_DIR" "$OUT/results/gpu"
    if [ "$DRY" = 1 ]; then
        stage study "$B_STUDY" "$PY" benchmarks/study.py --config configs/study_gpu.yaml --quick --device cpu \
            --jobs 1 --threads 1 --data-dir "$DATA" --results "$OUT/results/gpu" --runs-dir "$RUNS_DIR" \
            --deadline $((B_STUDY - 20))
    else
        stage study "$B_STUDY" "$PY" benchmarks/study.py --config configs/study_gpu.yaml --device cuda \
            --jobs 4 --threads 3 --data-dir "$DATA" --results "$OUT/results/gpu" --docs "$OUT/results/gpu" \
            --runs-dir "$RUNS_DIR" --deadline $((B_STUDY - 35))
    fi
fi

# 5. The framework callbacks under the frameworks' FSDP2 (torchrun, one process per part)
if skip_unless fsdp "$B_FSDP" torch lightning transformers accelerate ${NEEDS_CUDA[@]+"${NEEDS_CUDA[@]}"}; then
    stage fsdp "$B_FSDP" "$PY" scripts/gpu_fsdp_check.py "$OUT/fsdp.json" --device "$DEVICE" \
        ${DRY_FLAG[@]+"${DRY_FLAG[@]}"}
fi

# 6. Training memory on CUDA: every cell in one process, the peak reset per cell (the CPU rehearses it, tiny)
if skip_unless memory "$B_MEMORY" torch torchvision transformers ${NEEDS_CUDA[@]+"${NEEDS_CUDA[@]}"}; then
    if [ "$DRY" = 1 ]; then
        stage memory "$B_MEMORY" "$PY" benchmarks/memory.py --device cpu --in-process --tiny --dtypes fp32,bf16 \
            --optimizers sgd --methods dense,maxq --steps 1 --threads 1 --out "$OUT/memory.json"
    else
        stage memory "$B_MEMORY" "$PY" benchmarks/memory.py --device cuda --in-process --models linear8,resnet50,gpt2 \
            --dtypes fp32,bf16 --optimizers sgd --steps 2 --threads 4 --out "$OUT/memory.json"
    fi
fi

finalize --final
RC=$?
echo
cat "$OUT/summary.md"
[ "$RC" -eq 0 ] # the exit status: 0 only if every stage passed (or was skipped for a missing package)
