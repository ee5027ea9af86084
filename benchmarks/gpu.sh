#!/usr/bin/env bash
# The GPU checks, in one call on a machine with CUDA (see README "Performance").
# Usage, from the repository root:  bash benchmarks/gpu.sh
# openTSNE may be missing on the device machine: carry its wheel in .whl/ and this
# script installs it into /tmp/site first. The benchmarks do not take --device yet
# (issue 14), so today this runs the GPU tests: CUDA against the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
rc=0
echo "== GPU tests (CUDA against the CPU)"
time python3 -m pytest -q -p no:cacheprovider -m gpu tests || rc=1
exit $rc
