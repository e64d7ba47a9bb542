#!/usr/bin/env bash
# `make gpu-wheels`: the wheels an air-gapped GPU machine lacks, in one folder that travels with the
# repository (README "GPU check on an air-gapped machine"). Its image has torch, accelerate, peft,
# transformers, safetensors and pytest, but not diffusers, hydra-core, omegaconf (nor wandb,
# matplotlib, torchvision: the check needs none of them), and reaches no package registry.
#   benchmarks/gpu/wheels.sh [OUT]      # OUT: gpu_wheels (git-ignored; name it in the device's carry)
set -euo pipefail
OUT=${1:-gpu_wheels}
PY=${PY:-python}
MAX_MIB=${MAX_MIB:-40}  # with the repository (~20 MB) under the 64 MiB that may travel
rm -rf "$OUT" && mkdir -p "$OUT"
get() { "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "$@"; }
# pure-Python wheels (any CPython): the libraries and what they need beyond the image
get "diffusers==0.42.1" "hydra-core==1.3.8" "omegaconf==2.3.1" "importlib_metadata==8.7.0" "zipp>=3.20" \
    "requests>=2.32" "urllib3>=2" "idna>=3" "certifi" "charset_normalizer>=3"
# hydra's parser runtime ships only as a source archive: built into a wheel here
"$PY" -m pip wheel -q --no-deps -w "$OUT" "antlr4-python3-runtime==4.9.3"
# Pillow is compiled: one wheel per CPython the machine may run (manylinux x86_64)
for v in 3.10 3.11 3.12 3.13; do
  get --python-version "$v" --platform manylinux_2_28_x86_64 "pillow==12.1.0" \
    || echo "gpu-wheels: no Pillow wheel for CPython $v (skipped)" >&2
done
# not this package's wheel: the repository travels anyway (run.sh runs it from src/), and the wheel
# would carry the toy weights (14 MB) a second time
size=$(du -sm "$OUT" | cut -f1)
if [ "$size" -ge "$MAX_MIB" ]; then
  echo "gpu-wheels: $OUT is $size MiB, over $MAX_MIB MiB" >&2; exit 1
fi
echo "gpu-wheels: $(ls "$OUT" | wc -l) wheels, $size MiB in $OUT"
