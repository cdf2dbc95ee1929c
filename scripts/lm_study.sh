#!/usr/bin/env bash
# The language-model study of docs/RESULTS.md §8 (configs/study_lm.yaml), in the background and resumable:
#
#   mkdir -p results/lm/logs && setsid nohup nice -n 19 scripts/lm_study.sh > results/lm/logs/study.log 2>&1 &
#   kill -- -PGID          # stop it (the study and its runs: one process group); run the line above to continue
#
# 1. The parent (tokenizer, then a GPT-2-architecture model trained from scratch; checkpointed every 500 steps, so an
#    interrupted parent resumes exactly), 2. every arm x budget x seed from it, 2 at a time on 1 thread each; finished
#    runs (a record in results/lm/) are skipped. 3. The report: results/lm/summary.json, docs/study_lm.png and the
#    generated block of docs/RESULTS.md §8.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
echo "start $(date -u +%FT%TZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
$PY benchmarks/lm_study.py --config configs/study_lm.yaml --jobs 2 --threads 1 --parent-threads 1 \
  || echo "study: some runs failed (see results/lm/status.json and results/lm/logs/)"
echo "end $(date -u +%FT%TZ)"
