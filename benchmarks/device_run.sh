#!/bin/bash
# One device call, several stages; every log goes to $OUT (at most 8 files come back).
#   GIT_SHA=$(git rev-parse --short HEAD) bash benchmarks/device_run.sh suite check sanitize hostgpu
# Stages: suite (pytest -m gpu), check (gpu_check.py), sanitize (memcheck), hostgpu (host_vs_gpu.py at
# 16x1024), gpunew (the GPU tests named by GPU_K, full log), b1024 / b8192 (bench_attention.py), models (bench_models.py --padded), host (host_overhead.py).
set -u
export PYTHONPATH=$PWD/src:$PWD/tests:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHA=${GIT_SHA:-unknown}
LOG=$OUT/device_$SHA.md
{ echo "# $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), git $SHA"
  python3 -c 'import torch, triton, sys; print("torch", torch.__version__, "triton", triton.__version__, "python", sys.version.split()[0])'; } >> "$LOG"
for stage in "$@"; do
  t0=$(date +%s)
  case $stage in
    suite) echo -e "\n## pytest -m gpu tests/gpu" >> "$LOG"
           python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider > "$OUT/suite.log" 2>&1
           grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/suite.log" | tail -30 >> "$LOG" ;;
    gpunew) python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -k "${GPU_K:-changing_padding or new_lengths or reduce_overhead}" > "$OUT/gpunew.log" 2>&1
           tail -3 "$OUT/gpunew.log" >> "$LOG" ;;
    check) echo -e "\n## benchmarks/gpu_check.py" >> "$LOG"
           python3 benchmarks/gpu_check.py 2>&1 | tail -40 >> "$LOG" ;;
    sanitize) echo -e "\n## compute-sanitizer memcheck benchmarks/sanitize_cases.py" >> "$LOG"
           timeout 240 compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitize_cases.py 2>&1 | tail -25 >> "$LOG"
           echo "exit ${PIPESTATUS[0]}" >> "$LOG" ;;
    hostgpu) python3 benchmarks/host_vs_gpu.py --out "$OUT" --tag "16x1024_$SHA" ${HOSTGPU_ARGS:-} > "$OUT/hostgpu.log" 2>&1 ;;
    b1024) python3 benchmarks/bench_attention.py --shapes 16x1024 --out "$OUT" --tag "16x1024_$SHA" > "$OUT/b1024.log" 2>&1 ;;
    b8192) python3 benchmarks/bench_attention.py --shapes 2x8192 --out "$OUT" --tag "2x8192_$SHA" ${B8192_ARGS:-} > "$OUT/b8192.log" 2>&1 ;;
    models) python3 benchmarks/bench_models.py --padded --out "$OUT" > "$OUT/models.log" 2>&1 ;;
    host) python3 benchmarks/host_overhead.py --variants ${HOST_VARIANTS:-causal,document,alibi} ${HOST_ARGS:-} > "$OUT/host_$SHA.md" 2>&1 ;;
    *) echo "unknown stage $stage" >> "$LOG" ;;
  esac
  echo "($stage: $(( $(date +%s) - t0 )) s)" >> "$LOG"
done
cat "$LOG"
