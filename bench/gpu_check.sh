#!/usr/bin/env bash
# Issue 13's GPU figures in one run on the lent H200 (about 9-10 minutes of device time).
#   here, once, in the checkout that travels:  bash bench/gpu_check.sh --prepare
#       -> .gpu_deps/ (gitignored, ~20 MB): wheels the device lacks (open_clip_torch, webdataset, ...) and
#          deepspeed's package folder (published as a source archive only; pure Python, ops JIT-built)
#   on the device (device tool: carry [".gpu_deps"], timeout_s 600):  bash bench/gpu_check.sh
#       -> prints a compact log; gpu_check.log, bench_job_{workers,device}.json and the trainer's and
#          plain loop's profile_ops_*.txt land in $OUT
# Step limits add up to ~585 s (install ~10 s); run it with timeout_s 600. bench/sync_check.py (host
# syncs per step by call site, CUDA's sync debug mode) runs apart when the profile tables leave a question.
# Each step has its own time limit; a failing step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
DEPS=.gpu_deps

if [ "${1:-}" = "--prepare" ]; then
  set -e
  py=${PYTHON:-.venv/bin/python}  # an interpreter with this project's deepspeed installed
  rm -rf "$DEPS" && mkdir -p "$DEPS/wheels" "$DEPS/site"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEPS/wheels" open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 \
    wcwidth==0.9.4 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 \
    typing_inspection==0.4.5 typing_extensions==4.16.0
  site=$("$py" -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('deepspeed').submodule_search_locations[0]))")
  (cd "$site" && tar --exclude=__pycache__ -cf - deepspeed deepspeed-*.dist-info) | tar -C "$DEPS/site" -xf -
  du -sh "$DEPS" "$DEPS"/*
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check_out}
WORK=/tmp/gpu_check
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1
[ -d "$DEPS/wheels" ] || { echo "no $DEPS/wheels: run 'bash bench/gpu_check.sh --prepare' here and carry $DEPS"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$DEPS"/wheels/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site:$PWD/$DEPS/site" PYTHON=python3 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, deepspeed, open_clip, webdataset; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__, \
'| cpus', __import__('os').cpu_count())" || exit 1

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 15 "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - start)) s"
}

step "device input path tests" 30 python3 -m pytest -q -p no:cacheprovider tests/test_device_input.py
# the trainer against the plain loop in three settings, all compiled (both sides): DeepSpeed bf16 (bf16
# weights, fp32 master copy) vs amp_bf16 (fp32 weights, DeepSpeed's torch autocast, as the plain loop),
# ZeRO-1 vs ZeRO-0 (sync_check on the CPU: ZeRO-1's optimizer waits for the device 3-4 times a step,
# ZeRO-0's own clipping once); the first (the default settings) also profiles 4 steps of each side:
# GPU busy share, top kernels, top host calls (cuda*Synchronize rows: the host syncs). Compile on vs off
# runs apart (--compile off) when these leave the question open.
for variant in "bf16 1 4 115" "amp_bf16 1 0 105" "amp_bf16 0 0 95"; do
  set -- $variant
  step "bench_train distill, ViT-B-16, batch 256, $1, compile on, ZeRO-$2" "$4" \
    python3 bench/bench_train.py --nproc 1 --parts distill --model ViT-B-16 --batch 256 --precision "$1" \
    --compile on --zero "$2" --steps 15 --rounds 1 --profile "$3" --out "$WORK/bench_train_$1_zero$2"
done
for side in trainer baseline; do  # top operators by GPU time; the traces stay on the device (large)
  cp "$WORK/bench_train_bf16_zero1/profile_$side/profile/ops_rank0.txt" "$OUT/profile_ops_$side.txt" 2>/dev/null
done
# the real job, JPEGs decoded in 12 loader workers, then on the GPU (data.decode=device)
for decode in workers device; do
  step "bench_job, ViT-B-16 -> half, 224 px, batch 256, 12 workers, decode $decode" 120 \
    python3 bench/bench_job.py --model ViT-B-16 --batch 256 --workers 12 --steps 40 --warmup 15 \
    --log-every 10 --samples 2400 --shards 24 --set "data.decode=$decode" --out "$WORK/bench_job_$decode"
  cp "$WORK/bench_job_$decode/bench_job.json" "$OUT/bench_job_$decode.json" 2>/dev/null
done
echo "== gpu_check done in $SECONDS s"
