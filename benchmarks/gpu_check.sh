#!/usr/bin/env bash
# The GPU check, in one run on a machine with a CUDA GPU and no network, from the repo root:
#
#     bash benchmarks/gpu_check.sh
#
# It needs what `bash benchmarks/gpu_wheels.sh` put in .whl/ (run that where PyPI is reachable
# and carry .whl along): the wheels this machine lacks and the default model's shape
# (.whl/smollm2-shape). It uses the machine's python3 with its own torch, triton and transformers.
#
# Steps, each in its time box (`timeout`; 3 s more to exit), under 9 minutes in all (about 5 on an H200):
#   install     25 s  the carried wheels into $SCRATCH/site (no index, no deps)
#   model       40 s  the SmolLM2-shaped random-weights model (benchmarks/gpu_model.py weights)
#   pytest     110 s  `pytest -m cuda` on tests/test_cuda.py: greedy parity with transformers in float32
#                     (tiny models, and the SmolLM2-shaped one: 8 prompts x 48 tokens, batched and one at
#                     a time), CUDA graphs vs eager, bf16 vs float32, KV cache vs gpu_memory_utilization
#   offline    2 x 32 s  `LLM.generate`, 128 prompts of 128 in / 128 out, bf16, CUDA graphs / --enforce-eager
#   serve      2 x 100 s the server on 127.0.0.1 under `bench serve` at 1, 16, 64, 256 concurrent
#                     (128 in / 128 out, ignore_eos), graphs / --enforce-eager
#   transformers  90 s  `generate` on static batches of 1, 16, 64, 256, bf16, 128 new tokens
#   report      10 s  the table
# Everything lands in ${OUT:-gpu-results}/: gpu_check.log (all output), gpu_results.json and
# gpu_results.md (the table: output tok/s per concurrency with graphs on and off, transformers'
# tok/s and the ratios, TPOT median at concurrency 1). A step that fails or runs out of time is
# recorded and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
SCRATCH=$(mktemp -d -t atomr-gpu-check.XXXXXX)
MODEL=$SCRATCH/smollm2-shape
PY=python3
exec > >(tee -a "$LOG") 2>&1

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TQDM_DISABLE=1  # progress bars would fill the log

step() {  # step NAME SECONDS COMMAND...: run COMMAND in its time box, record exit status and time
  local name=$1 box=$2
  shift 2
  echo
  echo "=== $name (time box ${box} s) === $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout -k 3 "$box" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "--- $name: stopped by its ${box} s time box"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$SCRATCH/steps.tsv"
  echo "--- $name: exit $rc after $((SECONDS - t0)) s"
  return 0
}

stop_server() {  # stop a server that gpu_bench.py could not (its step was killed); show its log's end
  echo "--- server log ($1), last lines:"
  tail -n 25 "$SCRATCH/server-$1.log" 2>/dev/null
  if [[ -f $SCRATCH/server.pid ]]; then
    local pid
    pid=$(cat "$SCRATCH/server.pid")
    kill -TERM -- "-$pid" 2>/dev/null && sleep 3
    kill -KILL -- "-$pid" 2>/dev/null
    rm -f "$SCRATCH/server.pid"
  fi
  return 0
}

export CHECK_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '(no git)')
export CHECK_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
echo "GPU check of $CHECK_COMMIT at $CHECK_DATE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"

if ! compgen -G ".whl/*.whl" > /dev/null || [[ ! -f .whl/smollm2-shape/config.json ]]; then
  echo "no .whl/*.whl or .whl/smollm2-shape: run 'bash benchmarks/gpu_wheels.sh' on a machine with PyPI and carry .whl"
  exit 2
fi

# pip when this python has it, else unpack the wheels (what pip --target does for these wheels)
export PY SITE="$SCRATCH/site"
step install 25 bash -c '$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl || $PY -c "import glob, os, zipfile
for w in sorted(glob.glob(\".whl/*.whl\")): zipfile.ZipFile(w).extractall(os.environ[\"SITE\"])"'
export PYTHONPATH=$SITE:$ROOT

timeout 20 $PY - <<'EOF' > "$SCRATCH/environment.json" || echo '{}' > "$SCRATCH/environment.json"
import json, os, platform, torch, transformers, triton
print(json.dumps({
    "commit": os.environ["CHECK_COMMIT"], "date": os.environ["CHECK_DATE"], "cpus": os.cpu_count(),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
    "transformers": transformers.__version__, "python": platform.python_version()}))
EOF
cat "$SCRATCH/environment.json"

cp -r .whl/smollm2-shape "$MODEL"
step model 40 $PY benchmarks/gpu_model.py weights "$MODEL" --dtype bfloat16

export ATOMR_TRIO_GPU_MODEL=$MODEL  # tests/test_cuda.py's SmolLM2-shaped tests run on it
step pytest 110 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --timeout 60 -o addopts="-ra"
grep -E "(passed|failed|skipped|errors?|no tests ran).* in [0-9.]+s" "$LOG" | tail -1 > "$SCRATCH/pytest-summary.txt"

BENCH=(benchmarks/gpu_bench.py)
step offline-graphs 32 $PY "${BENCH[@]}" offline --model "$MODEL" --scratch "$SCRATCH" --num-prompts 128
step offline-eager 32 $PY "${BENCH[@]}" offline --model "$MODEL" --scratch "$SCRATCH" --num-prompts 128 --enforce-eager
step serve-graphs 100 $PY "${BENCH[@]}" serve --model "$MODEL" --scratch "$SCRATCH" --budget-s 91
stop_server graphs
step serve-eager 100 $PY "${BENCH[@]}" serve --model "$MODEL" --scratch "$SCRATCH" --budget-s 91 --enforce-eager
stop_server eager
step transformers 90 $PY "${BENCH[@]}" transformers --model "$MODEL" --scratch "$SCRATCH"
step report 10 $PY "${BENCH[@]}" report --scratch "$SCRATCH" --out "$OUT"

echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$SCRATCH"
