#!/usr/bin/env bash
# probmask's GPU figures in one call, on a machine with a CUDA device (about 8 minutes on one GPU):
#   1. the CUDA tests: tests/test_cuda.py, and tests/test_triton.py / tests/test_kernels.py on the GPU;
#   2. a training step against dense, time and peak memory (K=1 and K=2; LeNet-300-100 and ResNet-32):
#      benchmarks/step.py --device cuda;
#   3. the projection of LeNet-300-100's and ResNet-50's scores: benchmarks/projection.py --device cuda.
# Only the library and PyTorch (with Triton) are needed there: the sources are used in place and the
# C kernels (for the CPU comparisons) are built in place if they are not there yet.
#
# Usage: benchmarks/gpu.sh [PYTHON]     (default: .venv/bin/python if it exists, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: benchmarks/gpu.sh needs one')" || exit 2
"$PY" -c "import probmask.kernels.cpu as c, sys; sys.exit(0 if c.available() else 1)" 2>/dev/null \
  || "$PY" setup.py -q build_ext --inplace >/dev/null 2>&1 \
  || echo "(the C kernels could not be built: CPU comparisons are skipped)"
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

status=0
echo "== 1. CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton.py tests/test_kernels.py \
  || status=1
echo "== 2. training step against dense (benchmarks/step.py --device cuda)"
"$PY" benchmarks/step.py --device cuda --models lenet,resnet32 --reps 30 || status=1
echo "== 3. projection (benchmarks/projection.py --device cuda)"
"$PY" benchmarks/projection.py --device cuda --reps 11 || status=1
exit $status
