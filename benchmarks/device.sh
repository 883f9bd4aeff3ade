#!/usr/bin/env bash
# The GPU benchmark runs, as one command on a lent accelerator machine (see benchmarks/results/README.md).
#   bash benchmarks/device.sh PART OUTDIR [SHA]
# PART: "a" = the GPU tests, then the S1024 forward's dispatch (benchmarks/scripts/
#       attention_dispatch.py: per-call times of the zoo's, JAX's direct and PyTorch's cuDNN
#       attention, the memsets per call by size, the compiled program);
#       "b" = `zoo bench gpt_step` (the step at B64, bf16 logits, cut at 270 s: the fastest
#       measured, GPTConfig.qkv "separate", gelu "epilogue", layer_norm "pallas" and logsumexp
#       "pallas"; the PyTorch peer, nanoGPT's step torch.compile'd; the fastest again with XLA's
#       Triton GEMMs off for its compile (the 2026-11-27 lease's program had no cuBLASLt epilogue);
#       then, as time allows, the same with xent "fused" (its kernel's tiling is new), bf16
#       logits with GPTConfig's "auto" defaults (the Pallas layer norm and logsumexp), bf16
#       logits alone; synced and pipelined rows, the zoo's each with a kernel table of synced
#       steps and one of three pipelined steps; the single variants, the GELU-backward kernel's
#       run, PyTorch eager, the cuBLASLt-epilogue and no-command-buffer variants stay available
#       (ZOO_GPT_STEP_RUNS, steps): all measured on earlier leases), then zoo.ops's Pallas
#       kernels alone at several tilings against the XLA forms they replace
#       (benchmarks/scripts/pallas_kernels.py, cut at 60 s: the loss's logsumexp, the loss with
#       its gradient, the layer norm's forward and backward, the MLP's GELU backward in a
#       matmul; around the tilings the 2026-11-27 lease's sweep made the defaults);
#       "d" = `zoo bench attention`'s full set (in two processes: full, causal; 13 of 16 cases
#       >= 0.95x PyTorch's cuDNN on three leases; the S1024 cases with XLA's command buffers for
#       cuDNN calls, step attention-s1024-cmdbuf, ran on 2026-11-27: 0.82 / 0.86x for the
#       forwards; the step "plans", benchmarks/scripts/attention_plans.py, prints each side's
#       cuDNN kernels by name: run on 2026-11-27, the same on both sides);
#       "c" = `zoo bench
#       diffusion` (full set, with the diffusers / torch.compile peers; its goals were met on
#       2026-11-26) and `zoo bench gibbs` (issue 4 is blocked): only when a lease has time left;
#       or a comma list of the steps themselves, run in that order: tests, gibbs, gibbs-cublas,
#       attention, attention-fault, attention-s1024-cmdbuf, plans, dispatch, gelu (the MLP's GELU forms alone,
#       benchmarks/scripts/gelu_forms.py, measured on two leases), pallas, gpt_step, gpt_step-cublas, gpt_step-cublaslt, gpt_step-nocmdbuf, diffusion.
# A 15-minute lease: benchmarks/lease.sh runs a, b, then d in one call, every step cut at a
# deadline (ZOO_DEVICE_DEADLINE, below; part b's leaves d its reserve). a: ~55 s (2026-11-27:
# the tests 39 s, dispatch ~16 s). b: 330 s by its limits (each zoo B64 run ~80 s with its
# profiles, the torch.compile'd peer with its compile ~80 s; the Pallas kernels ~80 s, cut at 60:
# the GELU-backward kernel's sweep, last, is what goes). d: the
# attention set with its pauses ~180 s (<= 300 s by its limits, 390 with the rerun of a faulting
# part): what the reserve leaves. The seventh lease (2026-11-27, the Pallas sweep first and the
# peer last in b, a 100 s reserve) lost the peer's rows and the causal attention set.
# The GPU's SM clock, power and temperature are logged each second to OUTDIR/clocks-PART.csv
# (does a sustained step run below the boost clock?).
# gpt_step and diffusion print a kernel table of the zoo's program (ZOO_PROFILE=1, zoo/bench/profile.py) with the idle time between
# kernels and the largest gaps, and write the compiled program (NAME.hlo.txt.gz, ZOO_PROFILE_DIR),
# which names the table's fusions. The log is OUTDIR/log-PART.txt (commas in PART become '_': a
# returned file's name may hold no comma).
# Runs the tree as is (PYTHONPATH, no install); Python packages the machine lacks or holds in other
# versions travel as wheels in .whl/ (ml_collections, nvidia-cudnn-frontend for zoo.ops.cudnn_direct; flax,
# optax, chex, diffusers where the image's differ) and go to
# /tmp/site. Each benchmark has its own time limit, prints its rows as each case finishes (into
# OUTDIR/log-PART.txt) and writes OUTDIR/NAME-gpu.json when it completes (until then, and where a
# limit cuts it, its finished rows are in OUTDIR/NAME-gpu.json.partial.jsonl, the header first).
set -u
[ $# -ge 2 ] || { echo "usage: bash benchmarks/device.sh a|b|c|d|STEPS OUTDIR [SHA]" >&2; exit 2; }
part=$1 out=$2
case $part in
  a) steps=cublaslt,cudnn,tests,dispatch ;;  # cuDNN's library builds meanwhile (below)
  b) steps=gpt_step,pallas ;;
  c) steps=diffusion,gibbs ;;
  d) steps=attention ;;
  *) steps=$part ;;
esac
for step in ${steps//,/ }; do
  case $step in cudnn|cublaslt|tests|gibbs|gibbs-cublas|attention|attention-fault|attention-s1024-cmdbuf|plans|dispatch|gelu|pallas|gpt_step|gpt_step-cublas|gpt_step-cublaslt|gpt_step-nocmdbuf|diffusion) ;;
    *) echo "device.sh: unknown PART or step '$step' (a, b, c, d, or a comma list of: cudnn cublaslt tests gibbs gibbs-cublas attention attention-fault attention-s1024-cmdbuf plans dispatch gelu pallas gpt_step gpt_step-cublas gpt_step-cublaslt gpt_step-nocmdbuf diffusion)" >&2; exit 2 ;;
  esac
done
export ZOO_GIT_SHA=${3:-unknown} ZOO_PROFILE=1 ZOO_PROFILE_DIR=$2 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export ZOO_COMPILATION_CACHE=""  # nothing to reuse on a fresh machine
log=$out/log-${part//,/_}.txt
mkdir -p "$out"
# step cudnn's verdict (an earlier part's, same OUTDIR): the direct cuDNN call failed its check
[ -f "$out/cudnn-direct-off" ] && export ZOO_CUDNN_DIRECT=0
# it passed: auto takes it (ZOO_CUDNN_DIRECT=1; unset, auto keeps JAX's cuDNN call)
[ -f "$out/cudnn-direct.env" ] && . "$out/cudnn-direct.env"
# and step cublaslt's (zoo.ops.cublaslt's calls: both, or its weight-gradient call alone)
[ -f "$out/cublaslt-off" ] && export ZOO_CUBLASLT=0
[ -f "$out/cublaslt-ZOO_CUBLASLT_WGRAD-off" ] && export ZOO_CUBLASLT_WGRAD=0
[ -f "$out/cublaslt.env" ] && . "$out/cublaslt.env"
. benchmarks/wheels.sh
use_wheels "$log"

# ZOO_DEVICE_DEADLINE (seconds since the epoch; benchmarks/lease.sh sets it): no step runs past it,
# each step's limit is cut to what is left and a step with nothing left is skipped (status 124)
cap() {  # LIMIT_S -> that, or the seconds left before the deadline if fewer (0: none left)
  local lim=$1 left
  if [ -n "${ZOO_DEVICE_DEADLINE:-}" ]; then
    left=$(( ZOO_DEVICE_DEADLINE - $(date +%s) ))
    [ "$left" -lt "$lim" ] && lim=$left
  fi
  [ "$lim" -lt 0 ] && lim=0
  echo "$lim"
}
capped() {  # LIMIT_S COMMAND...: COMMAND under `timeout`, its limit cut at the deadline
  local lim
  lim=$(cap "$1"); shift
  if [ "$lim" -le 0 ]; then echo "=== skipped, past the deadline: $*"; return 124; fi
  timeout "$lim" "$@"
}

bench() {  # NAME LIMIT_S [SUFFIX XLA_FLAGS]
  echo "=== zoo bench $1${3:-} (limit $(cap "$2") s) ${4:-} $(date -u +%T)" | tee -a "$log"
  # a variant's compiled programs go to a folder of their own (same file names as the default run's)
  capped "$2" env XLA_FLAGS="${4:-}" ZOO_PROFILE_DIR="$out${3:+/${3#-}}" \
    python3 -m zoo bench "$1" --out "$out/$1${3:-}-gpu.json" 2>&1 \
    | grep -v "^WARNING: All log messages\|^E[0-9]\{4\} \|^external/\|EXECUTION FAILED" | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "=== $1${3:-} exit $rc $(date -u +%T)" | tee -a "$log"
}
check() {  # NAME SCRIPT LIMIT_S ENV [ENV3]: a direct call (zoo.ops.cudnn_direct, zoo.ops.cublaslt) built
  # and checked in a process of its own; if that fails or crashes, ENV=0 for the rest of the lease
  # (a later part in the same OUTDIR too: OUTDIR/NAME-off); exit status 3 with ENV3 given: only
  # the part ENV3 turns off failed, ENV3=0 (OUTDIR/NAME-ENV3-off). The check may write `export`
  # lines to the file ZOO_CHECK_ENV_FILE names (OUTDIR/NAME.env), sourced here and by later parts
  echo "=== $1 check $(date -u +%T)" | tee -a "$log"
  capped "$3" env ZOO_CHECK_ENV_FILE="$out/$1.env" python3 "$2" 2>&1 \
    | grep -v "^WARNING: All log messages\|^E[0-9]\{4\} \|^external/" | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  # a crash (a signal's status, 128 + its number; not timeout's 124): again under cuda-gdb (the
  # image has no gdb) for the native backtrace, as found the cuDNN check's on 2026-11-28
  if [ "$rc" -ge 128 ] && command -v cuda-gdb >/dev/null; then
    echo "=== $1 crashed (status $rc): again under cuda-gdb $(date -u +%T)" | tee -a "$log"
    capped 90 cuda-gdb -q -batch -ex "set pagination off" -ex "set cuda break_on_launch none" -ex run \
      -ex "bt 25" --args python3 "$2" 2>&1 | grep -v "New Thread\|exited\]\|Detaching after" | tail -60 | tee -a "$log"
  fi
  # what the check chose for the rest of the lease (the faster cuBLASLt weight-gradient epilogue)
  if [ -f "$out/$1.env" ]; then . "$out/$1.env"; cat "$out/$1.env" >>"$log"; fi
  if [ "$rc" = 3 ] && [ -n "${5:-}" ]; then
    touch "$out/$1-$5-off"
    export "$5=0"
    echo "=== $1: $5=0 for the rest of the lease" | tee -a "$log"
  elif [ "$rc" != 0 ]; then
    touch "$out/$1-off"
    export "$4=0"
    echo "=== $1 off for the rest of the lease" | tee -a "$log"
  fi
}
CUBLAS="--xla_gpu_enable_triton_gemm=false"  # XLA's GEMMs through cuBLAS only, not its Triton emitter
CUBLASLT="--xla_gpu_enable_cublaslt=true"  # lets XLA fuse bias adds (and bias + GELU) into cuBLASLt epilogues
# XLA's command buffers (CUDA graphs) for cuDNN calls too, from a program of one command up: the
# memsets before each cuDNN attention call as graph nodes rather than stream operations
CMDBUF_CUDNN="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, torch, sys; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
  # each side's cuDNN, and whether they share one library (once per lease: not again in parts b, d)
  case $part in b|d) ;; *) capped 60 python3 benchmarks/scripts/cudnn_libs.py ;; esac
} 2>&1 | tee -a "$log"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv -l 1 >"$out/clocks-${part//,/_}.csv" 2>/dev/null &
clocks=$!
# the direct cuDNN call's library (~50 s of g++ on the lease machines) built on a spare core while
# the steps before its check use the GPU; its check waits for it
building=""
if [[ ",$steps," == *,cudnn,* && "${ZOO_CUDNN_DIRECT:-}" != 0 ]]; then
  capped 150 python3 -c "from zoo.ops import cudnn_direct; print('cudnn-direct: built', cudnn_direct.build())" \
    >"$out/cudnn-build.txt" 2>&1 &
  building=$!
fi
trap 'kill $clocks $building 2>/dev/null' EXIT
# zoo bench attention: the unfused rows (each measured on the 2026-11-25/26 leases) are left out
# for the time (and zoo-cudnn: zoo-auto runs it, its forwards through zoo.ops.cudnn_direct where
# that builds; part a's dispatch times the S1024 forwards of both beside PyTorch's)
export ZOO_ATTENTION_SKIP=${ZOO_ATTENTION_SKIP-zoo-cudnn,zoo-reference,zoo-xla,zoo-chunked,torch-sdpa-math,torch-sdpa-efficient}
# The S1024 full case with XLA's default command buffers, the zoo's rows alone, then PyTorch's
# alone, each in a process of its own: which side's kernels make the illegal memory access that
# ended both attention parts on 2026-11-28 (each at its first fwd+bwd case; without command buffers
# every case ran; on the leases before, the same set ran with them)
attention_fault() {
  local torch_rows=torch-sdpa,torch-sdpa-flash,torch-sdpa-cudnn,torch-sdpa-efficient,torch-sdpa-math
  ZOO_ATTENTION_SKIP=$ZOO_ATTENTION_SKIP,$torch_rows ZOO_ATTENTION_LENGTHS=1024 ZOO_ATTENTION_MASKS=full \
    bench attention 45 -fault-zoo
  ZOO_ATTENTION_SKIP=$ZOO_ATTENTION_SKIP,zoo-auto,matmul-ceiling ZOO_ATTENTION_LENGTHS=1024 ZOO_ATTENTION_MASKS=full \
    bench attention 45 -fault-torch
}
for step in ${steps//,/ }; do
  case $step in
    cudnn)  # zoo.ops.cudnn_direct: if its check passes, auto's GPU forward for the rest of the
      # lease (ZOO_CUDNN_DIRECT=1); if it fails or crashes, off (auto is JAX's cuDNN call)
      if [ -n "$building" ]; then
        wait "$building"
        grep -v "^WARNING: All log messages\|^E[0-9]\{4\} \|^external/" "$out/cudnn-build.txt" | tee -a "$log"
      fi
      check cudnn-direct benchmarks/scripts/cudnn_direct_check.py 150 ZOO_CUDNN_DIRECT ;;
    cublaslt)  # zoo.ops.cublaslt (gpt_step's -gelu-grad-cublaslt and -qkv-grad-cublaslt runs): if
      # its check fails or crashes, the rest of the lease runs with it off (those runs lose their
      # own rows); if only its weight-gradient call fails, with that one off
      check cublaslt benchmarks/scripts/cublaslt_check.py 110 ZOO_CUBLASLT ZOO_CUBLASLT_WGRAD ;;
    tests)
      echo "=== GPU tests $(date -u +%T)" | tee -a "$log"
      capped 90 env JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_attention.py \
        tests/nn/test_dense.py tests/ops/test_layer_norm.py tests/ops/test_logsumexp.py tests/ops/test_linear_xent.py \
        tests/ops/test_matmul_gelu.py tests/ops/test_cudnn_direct.py tests/ops/test_cublaslt.py 2>&1 \
        | tail -5 | tee -a "$log" ;;
    gibbs) bench gibbs 120 ;;
    gibbs-cublas) bench gibbs 90 -cublas "$CUBLAS" ;;
    attention)  # in two processes, full then causal: a kernel fault (the 2026-11-26 H200 leases saw
      # illegal memory accesses twice, both at the first causal case after grouped ones) loses one
      # part only; a faulting part is run again without XLA's command buffers (CUDA graphs), to tell
      # whether they are the cause
      faulted=""
      for mask in full causal; do
        ZOO_ATTENTION_MASKS=$mask bench attention 150 -$mask
        if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then
          faulted=1
          ZOO_ATTENTION_MASKS=$mask bench attention 90 -$mask-nocmdbuf "--xla_gpu_enable_command_buffer="
        fi
      done
      # which side faults (2026-11-28: both parts, at their first fwd+bwd case, with command buffers)
      [ -n "$faulted" ] && attention_fault ;;
    attention-fault) attention_fault ;;
    plans)
      echo "=== attention plans $(date -u +%T)" | tee -a "$log"
      capped 120 python3 benchmarks/scripts/attention_plans.py 2>&1 \
        | grep -v "^WARNING: All log messages\|^E[0-9]\{4\} \|^external/" | tee -a "$log" ;;
    dispatch)  # the S1024 forward (the gap): memsets per call by size, the compiled program
      echo "=== attention dispatch, S1024 $(date -u +%T)" | tee -a "$log"
      capped 60 python3 benchmarks/scripts/attention_dispatch.py --seqs 1024 --hlo-dir "$out" 2>&1 \
        | grep -v "^WARNING: All log messages\|^E[0-9]\{4\} \|^external/" | tee -a "$log" ;;
    attention-s1024-cmdbuf)  # the S1024 cases (full and causal, one process) with $CMDBUF_CUDNN
      ZOO_ATTENTION_LENGTHS=1024 bench attention 75 -s1024-cmdbuf "$CMDBUF_CUDNN" ;;
    gelu)
      echo "=== GELU forms $(date -u +%T)" | tee -a "$log"
      capped 90 python3 benchmarks/scripts/gelu_forms.py 2>&1 \
        | grep -v "^WARNING: All log messages\|^E[0-9]\{4\} \|^external/" | tee -a "$log" ;;
    pallas)
      echo "=== Pallas kernels $(date -u +%T)" | tee -a "$log"
      capped 60 python3 benchmarks/scripts/pallas_kernels.py 2>&1 \
        | grep -v "^WARNING: All log messages\|^E[0-9]\{4\} \|^external/" | tee -a "$log" ;;
    gpt_step) bench gpt_step 270 ;;  # its first runs (~80 s each until 2026-11-27, one compile fewer since), the rest as time allows
    gpt_step-cublas) bench gpt_step 110 -cublas "$CUBLAS" ;;
    gpt_step-cublaslt) ZOO_GPT_STEP_RUNS=64-bf16-logits bench gpt_step 130 -cublaslt "$CUBLASLT" ;;
    gpt_step-nocmdbuf) ZOO_GPT_STEP_RUNS=64-bf16-logits bench gpt_step 90 -nocmdbuf "--xla_gpu_enable_command_buffer=" ;;
    diffusion)
      python3 -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__)" 2>&1 | tee -a "$log"
      bench diffusion 180 ;;
  esac
done
