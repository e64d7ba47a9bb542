#!/usr/bin/env bash
# The air-gapped procedure rehearsed on this machine at CPU scale (README "GPU check on an air-gapped
# machine"): a fresh venv holding only what the GPU image holds (torch, accelerate, peft,
# transformers, safetensors, pytest; no --system-site-packages), a copy of the files that travel
# (tracked and untracked-not-ignored, plus gpu_wheels/), then run.sh --cpu-scale there, offline.
#   benchmarks/gpu/try_offline.sh [WORK]   # needs gpu_wheels/ (make gpu-wheels) and, once, a registry
set -euo pipefail
WORK=${1:-/tmp/rlcm-gpu-rehearsal}
PY=${PY:-python3}
mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then  # the image's packages (minutes, from the registries)
  "$PY" -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu
  "$WORK/venv/bin/pip" install -q accelerate peft transformers safetensors pytest
fi
rm -rf "$WORK/tree" "$WORK/out" && mkdir -p "$WORK/tree"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$WORK/tree"
cp -r gpu_wheels "$WORK/tree/"
du -sm "$WORK/tree" | awk '{print "travels: " $1 " MiB (at most 64)"}'
cd "$WORK/tree" && OUT="$WORK/out" PY="$WORK/venv/bin/python" PIP_NO_INDEX=1 benchmarks/gpu/run.sh --cpu-scale
