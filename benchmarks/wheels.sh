# Sourced by benchmarks/device.sh and benchmarks/direct_calls.sh: use_wheels LOG installs the
# Python packages that travel as wheels in .whl/ (those the lent machine lacks or holds in other
# versions) into /tmp/site, pip's output into LOG, and puts them and the tree on PYTHONPATH; with
# no .whl/, the tree alone. Exits the script if the install fails.
use_wheels() {
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$1" 2>&1 || { echo "wheel install failed"; tail -20 "$1"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
}
