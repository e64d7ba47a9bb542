#!/usr/bin/env bash
# The GPU check on an air-gapped machine (README "GPU check on an air-gapped machine"), from the
# repository root there, after `make gpu-wheels` here put the missing wheels in gpu_wheels/:
#   OUT=/path/to/report benchmarks/gpu/run.sh [gpu_check options, e.g. --cpu-scale]
# Installs the carried wheels without any index, then runs `make gpu-check`'s module from src/
# within 8 minutes in all; the report (gpu-DEVICE.json and .md, written after every run) and the
# logs go to $OUT.
set -euo pipefail
: "${OUT:?set OUT to the folder the report goes to}"
WHEELS=${WHEELS:-gpu_wheels}
PY=${PY:-python}
LIMIT_S=${LIMIT_S:-480}    # the whole check, member building included (8 minutes)
BUDGET_S=${BUDGET_S:-400}  # no run starts that would end after this (gpu_check --budget-s)
mkdir -p "$OUT"
# an image whose Python is "externally managed" (PEP 668) takes the wheels too; nothing is fetched
PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-index --find-links "$WHEELS" \
  diffusers hydra-core omegaconf pillow >"$OUT/install.log" 2>&1 \
  || { tail -5 "$OUT/install.log" >&2; exit 1; }
# the configs resolve as the package rlcm_exp.conf: the source tree's link (not carried as a link)
[ -e src/rlcm_exp/conf ] || ln -s ../../conf src/rlcm_exp/conf
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
start=$(date +%s)
set +e
timeout --kill-after=15 "$LIMIT_S" "$PY" -m benchmarks.bench.gpu_check --out "$OUT" --budget-s "$BUDGET_S" \
  --run-timeout-s 150 "$@" >"$OUT/gpu-check.log" 2>&1
rc=$?
set -e
tail -30 "$OUT/gpu-check.log"
echo "gpu-check: exit $rc after $(( $(date +%s) - start )) s; report in $OUT"
exit "$rc"
