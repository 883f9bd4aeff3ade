#!/usr/bin/env bash
# The direct GPU calls (zoo.ops.cublaslt, zoo.ops.cudnn_direct) on a lent GPU, in the few minutes a
# lease has left after benchmarks/lease.sh: the cuBLASLt check; if it passes, `zoo bench gpt_step`'s
# fastest run beside the same with every kernel and XLA's Triton GEMMs off (one process, no kernel
# profiles); then the cuDNN check under cuda-gdb (the image has no gdb), for a native backtrace
# where it crashes, with the cuDNN frontend's log. The cuDNN library (~50 s of g++) builds on a
# spare core meanwhile. Every step is cut at BUDGET_S (default 220) from the start.
#   bash benchmarks/direct_calls.sh OUTDIR [SHA] [BUDGET_S]     (from the repository root, .whl carried)
# Leaves OUTDIR/log-direct.txt, and gpt_step-gpu.json (or its .partial.jsonl).
set -u
[ $# -ge 1 ] || { echo "usage: bash benchmarks/direct_calls.sh OUTDIR [SHA] [BUDGET_S]" >&2; exit 2; }
out=$1 sha=${2:-unknown} budget=${3:-220}
end=$(( $(date +%s) + budget ))
mkdir -p "$out"
log=$out/log-direct.txt
export ZOO_GIT_SHA=$sha PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 ZOO_COMPILATION_CACHE=""
. benchmarks/wheels.sh
use_wheels "$log"
left() { local s=$(( end - $(date +%s) )); [ "$s" -gt "$1" ] && s=$1; [ "$s" -lt 1 ] && s=1; echo "$s"; }
quiet() { grep -v "^WARNING: All log messages\|^E[0-9]\{4\} \|^external/"; }

python3 -c "from zoo.ops import cudnn_direct; print('cudnn-direct built:', cudnn_direct.build())" \
  >"$out/cudnn-build.txt" 2>&1 &
building=$!

echo "=== cublaslt check $(date -u +%T)" | tee -a "$log"
timeout "$(left 60)" env ZOO_CHECK_ENV_FILE="$out/cublaslt.env" python3 benchmarks/scripts/cublaslt_check.py 2>&1 \
  | quiet | tee -a "$log"
rc=${PIPESTATUS[0]}
echo "=== cublaslt check exit $rc" | tee -a "$log"
if [ -f "$out/cublaslt.env" ]; then . "$out/cublaslt.env"; cat "$out/cublaslt.env" >>"$log"; fi

base=64-bf16-logits-qkv-separate-gelu-epilogue-ln-pallas-lse-pallas
case $rc in
  0) runs=$base,$base-xent-fused-gelu-grad-cublaslt-qkv-grad-cublaslt-cublas ;;
  3) export ZOO_CUBLASLT_WGRAD=0; runs=$base,$base-gelu-grad-cublaslt-cublas ;;  # the DGELU call alone
  *) runs="" ;;
esac
if [ -n "$runs" ]; then
  echo "=== zoo bench gpt_step: $runs $(date -u +%T)" | tee -a "$log"
  timeout "$(left 130)" env ZOO_PROFILE=0 ZOO_GPT_STEP_RUNS="$runs" \
    python3 -m zoo bench gpt_step --out "$out/gpt_step-gpu.json" 2>&1 | quiet | tee -a "$log"
  echo "=== gpt_step exit ${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$log"
fi

echo "=== cudnn-direct: waiting for its build $(date -u +%T)" | tee -a "$log"
wait "$building"
cat "$out/cudnn-build.txt" >>"$log"
echo "=== cudnn-direct check under cuda-gdb $(date -u +%T)" | tee -a "$log"
check=(python3 -X faulthandler benchmarks/scripts/cudnn_direct_check.py)
export CUDNN_FRONTEND_LOG_INFO=1 CUDNN_FRONTEND_LOG_FILE=stderr CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr
if command -v cuda-gdb >/dev/null; then
  timeout "$(left 90)" cuda-gdb -q -batch -ex "set pagination off" -ex "set cuda break_on_launch none" \
    -ex run -ex "bt 40" -ex "info registers rip" --args "${check[@]}" 2>&1 | quiet | tail -150 | tee -a "$log"
else
  timeout "$(left 90)" "${check[@]}" 2>&1 | quiet | tail -150 | tee -a "$log"
fi
echo "=== done $(date -u +%T)" | tee -a "$log"
