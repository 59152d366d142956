#!/usr/bin/env bash
# The checks a session lent an NVIDIA GPU runs, in one device call (README, *Speed*; issue 8):
#   1. the speed benchmark for LLaVA-7B shapes in bfloat16 at batch 1 and 8, side by side with
#      transformers' PyTorch LLaVA in the same process, with peak device memory;
#   2. the tests that matter on a GPU: cuDNN attention (tests/test_gpu.py, skipped on CPU),
#      generation's equivalences (KV cache == no cache, batch == one by one, keep rate 1 ==
#      dense), bf16 decisions, and the official fixture's tokens in all three modes.
# Results land in $OUT (the device tool's folder; else ./gpu_check_out): env.txt,
# bench_b<batch>.json/.md/.err per batch size, tests.log.
#
# From this machine (the fixtures beside the checkout do not travel: copy them into the
# ignored .device/ folder and carry it):
#   rm -rf .device/shared && mkdir -p .device && cp -r ../shared .device/shared
#   device run: command "bash scripts/gpu_check.sh", carry [".device"], timeout_s 590
# GPU_CHECK_MODEL / GPU_CHECK_DTYPE / GPU_CHECK_BATCH change the benchmark (a dry run on CPU:
# GPU_CHECK_MODEL=cpu-small GPU_CHECK_DTYPE=float32 GPU_CHECK_BATCH="1 2" bash scripts/gpu_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in the benchmark, and pytest's CLI tests start processes of
# their own: no process takes 75 % of the memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
[ -d .device/shared ] && export DYNLLAVA_SHARED="$PWD/.device/shared"
MODEL=${GPU_CHECK_MODEL:-llava-v1.5-7b}
DTYPE=${GPU_CHECK_DTYPE:-bfloat16}
BATCH=${GPU_CHECK_BATCH:-1 8}
start=$SECONDS

{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, jax, flax, torch, transformers; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# One benchmark call per batch size, each with its own JSON: a timeout loses one, not both.
# XLA's bytes-per-step analysis compiles extra 7B programs: GPU_CHECK_BYTES=1 to include it.
BYTES_FLAG=--no-bytes
[ "${GPU_CHECK_BYTES:-0}" = 1 ] && BYTES_FLAG=
for b in $BATCH; do
  echo "== bench speed: $MODEL $DTYPE, batch $b, vs PyTorch"
  # shellcheck disable=SC2086
  timeout 240 python3 -m dynllava_jax.bench speed --model "$MODEL" --dtype "$DTYPE" --batch "$b" \
      --vs-torch --memory $BYTES_FLAG --json > "$OUT/bench_b$b.json" 2> "$OUT/bench_b$b.err"
  echo "bench exit $? after $((SECONDS - start)) s"
  tail -n 3 "$OUT/bench_b$b.err"
  python3 -c "import json, sys; from dynllava_jax.bench_speed import format_table; print(format_table(json.load(open(sys.argv[1]))))" \
      "$OUT/bench_b$b.json" > "$OUT/bench_b$b.md" 2>&1; cat "$OUT/bench_b$b.md"
done

echo "== tests"
timeout $((570 - (SECONDS - start) > 60 ? 570 - (SECONDS - start) : 60)) python3 -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_generate.py tests/test_bf16_decisions.py tests/test_official_fixture.py \
    > "$OUT/tests.log" 2>&1
echo "tests exit $? after $((SECONDS - start)) s"
tail -n 15 "$OUT/tests.log"
