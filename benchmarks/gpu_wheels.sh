#!/usr/bin/env bash
# Download, into .whl/ at the repo root, every wheel the GPU machine lacks for atomr_trio's runtime
# and tests (CPython 3.12, manylinux x86_64), and export the default model's shape (config,
# tokenizer, chat template; no weights) into .whl/smollm2-shape/. Run it on a machine that reaches
# PyPI; then carry `.whl` to the GPU machine and run `bash benchmarks/gpu_check.sh` there.
#
# The GPU image already has torch, triton, transformers, tokenizers, safetensors, numpy, jinja2,
# prometheus-client, httpx (+ httpcore, certifi), hypothesis, pytest, pytest-timeout, requests,
# tqdm, attrs, sortedcontainers, idna, h11, click, werkzeug, aiofiles, markupsafe,
# typing-extensions, packaging and psutil: none of those is downloaded. The versions below are
# those of the development venv (`pip freeze`), all of which have CPython 3.12 wheels.
#
# Usage: bash benchmarks/gpu_wheels.sh [PYTHON]   (PYTHON: an interpreter with atomr_trio's
# dependencies and the default model installed, for the export; default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST=.whl
mkdir -p "$DEST"

WHEELS=(
  # runtime
  trio==0.35.0 outcome==1.3.0.post0 sniffio==1.3.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  gguf==0.19.0 pyyaml==6.0.4
  hypercorn==0.18.0 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 priority==2.0.0 wsproto==1.3.2
  quart==0.22.0 flask==3.1.3 blinker==1.9.0 itsdangerous==2.2.0 quart-trio==0.12.0
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
  # tests
  pytest-trio==0.8.0
  openai==3.60.0 anyio==4.16.0 jiter==0.19.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
  jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
)

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 5 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done

for spec in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done

"$PY" benchmarks/gpu_model.py export "$DEST/smollm2-shape"

echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "%10d  %s\n", $5, $9}'
wheels=$(du -cb "$DEST" | tail -1 | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "total $DEST: $wheels bytes; tracked files: $tracked bytes; together $((wheels + tracked)) of 67108864"
if (( wheels + tracked >= 64 * 1024 * 1024 )); then
  echo "too big to carry (64 MiB)" >&2
  exit 1
fi
