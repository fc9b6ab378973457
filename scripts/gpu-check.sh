#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a short lease on a GPU machine:
# build, the S2 kernel tests, the attention and training benchmarks, then the rest
# of the test suite on the GPU. Logs go to $OUT (default ./gpu-out); a summary is
# printed last. Stages are skipped once DEADLINE seconds (default 400) would be
# passed, so a slow stage cannot eat the others' time.
#   STAGES="build kernel attn train checks suite" scripts/gpu-check.sh   (also: sft)
#   KERNEL_VARIANTS="pipe bulkdq" limits the kernel switches tested again (default: all nine)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
B="${BUILD_DIR:-/tmp/longlora-gpu-build}"
DEADLINE="${DEADLINE:-400}"
STAGES="${STAGES:-build kernel attn train checks suite}"
export PATH="/usr/local/cuda/bin:$PATH"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - SECONDS)); }
want() { [[ " $STAGES " == *" $1 "* ]] && [ "$(left)" -gt "${2:-20}" ]; }

note "== $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"

if want build; then
  PREFIX="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
  t0=$SECONDS
  if cmake -S . -B "$B" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX" \
       -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" >"$OUT/build.log" 2>&1 &&
     cmake --build "$B" -j"$(nproc)" >>"$OUT/build.log" 2>&1; then
    note "build: ok in $((SECONDS - t0)) s"
  else
    tail -40 "$OUT/build.log"
    note "build: FAILED"
    exit 1
  fi
fi
BIN="$B/longlora-train"

if want kernel; then
  timeout 200 ctest --test-dir "$B" -R "${KERNEL_TESTS:-S2Kernel|Fused|TrainMemory|TrainGolden|GpuTrain|GpuGenerate|LongLorasAdapterFiles}" -j8 --output-on-failure \
    >"$OUT/kernel.log" 2>&1
  note "kernel tests: $(grep -E 'tests passed|tests failed' "$OUT/kernel.log")"
  grep -E 'kernel max abs diff|non-finite|Failed|\*\*\*' "$OUT/kernel.log" | head -40 | tee -a "$SUMMARY"
  if [ -z "${SKIP_ALT:-}" ]; then
    # The S2 kernel tests again with other kernels selected: variant NAME LABEL VAR=1 ...
    variant() {
      local name=$1 label=$2
      shift 2
      [[ " ${KERNEL_VARIANTS:-alt 2d mma nopipe pipe bulkdq bulknopipe nostagger norows} " == *" $name "* ]] && [ "$(left)" -gt 60 ] || return 0
      env "$@" timeout 100 ctest --test-dir "$B" -R 'S2Kernel' -j8 --output-on-failure \
        >"$OUT/kernel_$name.log" 2>&1
      note "kernel tests, $label: $(grep -E 'tests passed|tests failed' "$OUT/kernel_$name.log")"
      grep -E 'kernel max abs diff|non-finite' "$OUT/kernel_$name.log" | head -10 | tee -a "$SUMMARY"
    }
    # The alternative tiles (16 query rows per warp with Q in registers; the other
    # backward key tile) must pass the same tests.
    variant alt "alternative tiles" LONGLORA_S2_FWD_ALT=1 LONGLORA_S2_BWD_ALT=1
    # The 2-D-tiled backward (s2_bwd2d_kernel.cuh): the default at D=128, forced here for
    # D=64 too.
    variant 2d "2-D-tiled backward" LONGLORA_S2_BWD_2D=1
    # The mma.sync kernels (s2_fwd_kernel.cuh, s2_bwd2d_kernel.cuh), which the wgmma ones
    # replace on sm_90.
    variant mma "mma.sync kernels" LONGLORA_S2_FWD_MMA=1 LONGLORA_S2_BWD_MMA=1
    # The wgmma backward without its pipelining (the default pipelines it); the
    # experiments: the wgmma forward pipelined, the backward's dQ by bulk adds.
    variant nopipe "unpipelined wgmma backward" LONGLORA_S2_BWD_PIPE=0
    variant pipe "pipelined wgmma forward" LONGLORA_S2_FWD_PIPE=1
    variant bulkdq "pipelined wgmma backward with bulk dQ" LONGLORA_S2_BWD_BULKDQ=1
    variant bulknopipe "unpipelined wgmma backward with bulk dQ" LONGLORA_S2_BWD_PIPE=0 LONGLORA_S2_BWD_BULKDQ=1
    # The defaults' predecessors: the wgmma forward without the warpgroups' turns, the
    # pipelined backward with dQ's atomics straight from the accumulators.
    variant nostagger "unstaggered wgmma forward" LONGLORA_S2_FWD_STAGGER=0
    variant norows "pipelined wgmma backward, dQ atomics from the accumulators" LONGLORA_S2_BWD_DQROWS=0
  fi
  # The torch-free kernel bench: default and alternative tiles must agree (GQA, roll).
  for D in 64 128; do
    if timeout 60 "$B/s2-kernel-bench" --seq-len 4096 --heads 8 --kv-heads 2 --head-dim "$D" \
         --mode roll --iters 3 >"$OUT/kernel_bench_$D.log" 2>&1; then
      note "s2-kernel-bench D=$D: default and alternative tiles agree"
    else
      note "s2-kernel-bench D=$D: FAILED"; cat "$OUT/kernel_bench_$D.log" | tee -a "$SUMMARY"
    fi
  done
  # Every wgmma configuration (unpipelined, the default's pipelined backward, both
  # pipelined, bulk dQ, pipelined with bulk dQ) against the mma.sync kernels at 32k, on
  # the same inputs in one process: agreement and timings.
  timeout 150 "$B/s2-kernel-bench" --seq-len 32768 --heads 32 --kv-heads 32 --head-dim 128 \
    --mode segments --iters 5 --all-wgmma 2>&1 | tee "$OUT/kernel_bench_wgmma.log" | tee -a "$SUMMARY"
fi

# One attention run per line: seq_len mode [VAR=value ...] (environment for the run).
ATTN_RUNS="${ATTN_RUNS:-8192 segments
32768 segments
100000 segments
102400 segments
32768 roll
32768 segments LONGLORA_S2_FWD_STAGGER=0 LONGLORA_S2_BWD_DQROWS=0
32768 segments LONGLORA_S2_BWD_PIPE=0
32768 segments LONGLORA_S2_FWD_PIPE=1
32768 segments LONGLORA_S2_BWD_BULKDQ=1
32768 segments LONGLORA_S2_FWD_MMA=1 LONGLORA_S2_BWD_MMA=1
32768 segments LONGLORA_S2_FWD_ALT=1 LONGLORA_S2_BWD_ALT=1}"
if want attn 30; then
  while read -r L mode envs; do
    [ -n "$L" ] && [ "$(left)" -gt 20 ] || continue
    note "-- attention L=$L mode=$mode $envs"
    env $envs timeout 90 "$BIN" bench attention --seq-len "$L" --heads 32 --kv-heads 32 \
      --head-dim 128 --dtype bf16 --mode "$mode" 2>&1 | tee -a "$OUT/attn.log" |
      grep -E '^(kernel|sdpa|backend|attention bench: (no|this))' | tee -a "$SUMMARY"
  done <<<"$ATTN_RUNS"
fi

# One 7B training bench per line: seq_len steps warmup [VAR=value ...] [--set key=value ...]
# (VAR=value words are the run's environment, e.g. LONGLORA_FUSED_OPS=0).
TRAIN_RUNS="${TRAIN_RUNS:-32768 3 1
32768 3 1 --set train.offload_activations=true
131072 1 0 --set train.offload_activations=true
8192 3 1
32768 2 1 --set attention.backend=sdpa}"
if want train 40; then
  n=0
  while read -r L steps warmup extra; do
    [ -n "$L" ] && [ "$(left)" -gt 40 ] || continue
    n=$((n + 1))
    envs=()
    args=()
    for w in $extra; do
      if [[ "$w" =~ ^[A-Z_][A-Z0-9_]*= ]]; then envs+=("$w"); else args+=("$w"); fi
    done
    note "-- train bench 7B L=$L $extra"
    env "${envs[@]}" timeout "${TRAIN_TIMEOUT:-150}" "$BIN" bench --shape configs/shapes/llama2-7b.json \
      --seq-len "$L" --steps "$steps" --warmup "$warmup" --json "${args[@]}" >"$OUT/train_$n.log" 2>&1
    { grep "^{" "$OUT/train_$n.log" || tail -3 "$OUT/train_$n.log"; } | tail -3 | tee -a "$SUMMARY"
  done <<<"$TRAIN_RUNS"
fi

if want checks 30; then
  # What only this machine shows: the sentencepiece module loads beside CUDA, and a step
  # that does not fit says so in one line (exit 1), not a stack of CUDA frames.
  if "$BIN" make-data --tokenizer configs/demo/tokenizer.model --out "$OUT/spm.jsonl" --overwrite --docs 5 \
       >"$OUT/spm.log" 2>&1; then
    note "sentencepiece module: loads (make-data wrote $(wc -l <"$OUT/spm.jsonl") documents)"
  else
    note "sentencepiece module: FAILED: $(tail -1 "$OUT/spm.log")"
  fi
  timeout 90 "$BIN" bench --shape configs/shapes/llama2-7b.json --seq-len 1048576 --steps 1 --warmup 0 \
    --set train.activation_checkpointing=false >"$OUT/oom.log" 2>&1
  note "out of memory: exit $?, $(grep -c . "$OUT/oom.log") line(s): $(tail -1 "$OUT/oom.log" | cut -c1-200)"
fi

# Instruction data shaped like LongAlpaca (answers of 100-3000 words after contexts of
# 1k-24k words), 7B shape from drawn weights at 32k: the micro-batch is cut to its
# longest row, so the step time follows the data, not seq_len. Not in the default
# stages (minutes): STAGES="build sft".
if want sft 120; then
  python3 - "$OUT/sft.json" <<'PY'
import json, random, sys
random.seed(1)
w = "the grass is green the sky is blue here we go there and back again".split()
text = lambda n: " ".join(random.choice(w) for _ in range(n))
recs = [{"instruction": text(random.randint(1000, 24000)) + "\nSummarize the text above.",
         "input": "", "output": text(random.randint(100, 3000))} for _ in range(64)]
json.dump(recs, open(sys.argv[1], "w"))
PY
  mkdir -p "$OUT/sft-model"
  cp configs/shapes/llama2-7b.json "$OUT/sft-model/config.json"
  cp configs/demo/tokenizer.model "$OUT/sft-model/tokenizer.model"
  timeout 300 "$BIN" --config configs/llama7b_32k.json --set model.init=random --set model.path="$OUT/sft-model" \
    --set data.train="$OUT/sft.json" --set data.format=sft --set train.max_steps=6 --set train.grad_accum=1 \
    --set output.dir="$OUT/sft-run" --set output.save_steps=1000 >"$OUT/sft.log" 2>&1
  note "sft 32k (cut rows): exit $?"
  grep -E "step [0-9]+/" "$OUT/sft.log" | tail -6 | tee -a "$SUMMARY"
fi

if want suite 40; then
  t=$(( $(left) - 10 ))
  # Most of these run on the CPU: 8 at a time, each with LibTorch's default of one
  # OpenMP thread per core, spun 16-thread pools against each other and timed out
  # CPU evals that take 1-11 s alone. Two threads each fill the 16 cores.
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" timeout "$t" ctest --test-dir "$B" -E 'S2Kernel|TrainMemory|TrainGolden|GpuTrain|GpuGenerate|LongLorasAdapterFiles' -j8 --timeout 120 --output-on-failure \
    ${SUITE_ARGS:-} >"$OUT/suite.log" 2>&1
  note "suite on GPU: $(grep -E 'tests passed|tests failed' "$OUT/suite.log")"
  grep -E '^\s+[0-9]+ - ' "$OUT/suite.log" | head -30 | tee -a "$SUMMARY"
fi
note "== done in $SECONDS s"
# Non-zero when a test or a kernel check failed, so a caller need not read the summary.
if grep -qE ' [1-9][0-9]* tests failed|FAILED' "$SUMMARY"; then exit 1; fi
