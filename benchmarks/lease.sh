#!/usr/bin/env bash
# A lease's GPU runs as one command: the device tool's one call of at most 600 s, on a machine that
# goes back 30 s after a call (a second call would likely pay a second start of the 15 minutes).
#   bash benchmarks/lease.sh OUTDIR [SHA] [BUDGET_S]
# Runs benchmarks/device.sh part a (zoo.ops.cudnn_direct built and checked, ~40 s the first time,
# with the cuDNN frontend's wheel in .whl; zoo.ops.cublaslt's two calls built, checked and timed, ~40 s; the
# GPU tests; the S1024 attention dispatch; ~150 s), part b (`zoo bench gpt_step`'s first runs:
# the fastest, the same with every kernel (xent fused, the cuBLASLt GELU backward and q/k/v
# weight gradients) and Triton GEMMs off, the same without xent fused, the torch.compile'd
# PyTorch peer; then the Pallas kernels alone at several tilings; 330 s by its limits), then part d (`zoo bench
# attention`'s full set, full then causal; ~180 s), each cut at what is left of BUDGET_S
# (default 580), part b at what is left less part d's reserve (RESERVE_S, default 180, at most a
# third of the budget), into a scratch folder, then leaves in OUTDIR what the tool returns (at
# most 8 files): the logs as text (log-a.txt, log-b.txt, log-d.txt: their ends are what one reads
# first) and everything, results JSON, clocks, compiled programs and logs, in lease.tar.gz. The
# seventh lease (2026-11-27, reserve 100 s, the peer last) lost the peer's rows and the causal
# attention set to the limit.
# Run from the repository root with `.whl` carried (see device.sh), e.g.
#   bash benchmarks/lease.sh $OUT 0123abc
set -u
[ $# -ge 1 ] || { echo "usage: bash benchmarks/lease.sh OUTDIR [SHA] [BUDGET_S]" >&2; exit 2; }
out=$1 sha=${2:-unknown} budget=${3:-580} reserve=${RESERVE_S:-180}
case $budget in
  ''|*[!0-9]*) echo "lease.sh: BUDGET_S must be a whole number of seconds, got '$budget'" >&2; exit 2 ;;
esac
case $reserve in
  ''|*[!0-9]*) echo "lease.sh: RESERVE_S must be a whole number of seconds, got '$reserve'" >&2; exit 2 ;;
esac
work=$(mktemp -d /tmp/lease.XXXXXX)
start=$SECONDS
# every step of device.sh is cut at this deadline (its own `timeout`s are process groups of their
# own, which a `timeout` around device.sh would not reach)
end=$(( $(date +%s) + budget ))
[ "$reserve" -le $(( budget / 3 )) ] || reserve=$(( budget / 3 ))
for part in a b d; do
  export ZOO_DEVICE_DEADLINE=$end
  [ "$part" = b ] && ZOO_DEVICE_DEADLINE=$(( end - reserve ))
  left=$(( ZOO_DEVICE_DEADLINE - $(date +%s) ))
  if [ "$left" -lt 5 ]; then
    echo "=== lease.sh: part $part skipped, ${left} s of the ${budget} s budget left" | tee -a "$work/log-$part.txt"
    continue
  fi
  echo "=== lease.sh: part $part, ${left} s of the ${budget} s budget left $(date -u +%T)"
  bash benchmarks/device.sh "$part" "$work" "$sha"
done
mkdir -p "$out"
cp "$work"/log-a.txt "$work"/log-b.txt "$work"/log-d.txt "$out"/ 2>/dev/null
tar czf "$out/lease.tar.gz" -C "$work" .
echo "=== lease.sh: done in $(( SECONDS - start )) s; in $out:"
ls -l "$out"
