#!/usr/bin/env bash
# The fine-tuning study of docs/RESULTS.md §7 (configs/study_finetune.yaml), in the background and resumable:
#
#   setsid nohup nice -n 19 scripts/finetune_study.sh > results/finetune/logs/study.log 2>&1 &
#   kill -- -PGID          # stop it (the study and its runs: one process group); run the line above to continue
#
# 1. WAIT_PID=N: first wait for process N to end (a parent run started by hand in results/finetune/runs/parent;
#    the study adopts a finished folder, and resumes an interrupted one).
# 2. Once the parent has finished: what the first forward of every method sees on it (benchmarks/before_finetune.py
#    -> results/finetune/before_finetune.json, once).
# 3. The study: parent (if not finished), then every fine-tuning run, 2 at a time on 1 thread each; finished runs
#    are skipped. Then `python benchmarks/study.py --config configs/study_finetune.yaml --report`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
echo "start $(date -u +%FT%TZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ -n "${WAIT_PID:-}" ]; then
  while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 30; done
  echo "process $WAIT_PID ended $(date -u +%FT%TZ)"
fi
parent=results/finetune/runs/parent
if [ -f "$parent/report.json" ] && [ ! -f results/finetune/before_finetune.json ]; then
  $PY benchmarks/before_finetune.py "$parent/checkpoint.pt" --threads 1
fi
$PY benchmarks/study.py --config configs/study_finetune.yaml --jobs 2 --threads 1 || echo "study: some runs failed (see results/finetune/status.json)"
if [ ! -f results/finetune/before_finetune.json ]; then
  $PY benchmarks/before_finetune.py "$parent/checkpoint.pt" --threads 1
fi
echo "end $(date -u +%FT%TZ)"
