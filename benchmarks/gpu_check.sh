#!/usr/bin/env bash
# Throughput check for one GPU machine (issues 14, 21): SAM ViT-H and SAM 2.1 hiera large (random
# weights, the real architectures) at 32x32 on 64 images of 1024x768, each SAM's reference flow
# (SamAutomaticMaskGenerator, SAM2AutomaticMaskGenerator) against ours (float32, bfloat16, with
# and without torch.compile), and the same-answer check at the shipped settings, in at most 8
# minutes; one JSON.
#
#   bash benchmarks/gpu_check.sh                            # GPU: the issue's configuration
#   bash benchmarks/gpu_check.sh --device cpu --images 1    # dry run (tiny SAM and SAM 2.1 tiny, 8x8, 256x192)
#   bash benchmarks/gpu_check.sh --json /tmp/out.json ...   # any option of benchmarks/gpu_check.py
#
# Needs the project installed beforehand (it installs nothing: a GPU machine may have no
# network):  pip install -c constraints.txt -e .   (a CUDA torch instead of the pinned CPU one
# where the machine has its own). PYTHON picks the interpreter (default: python3).
# What each flow measures: benchmarks/gpu_check.py's docstring; results: benchmarks/README.md.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
# The hard limit: the script's own budget (gpu_check.py --time-budget-s, 450 s) plus a margin
# for the flow running when it expires; the JSON is written after every flow, so it survives.
limit_s="${GPU_CHECK_LIMIT_S:-480}"

# This checkout's code, whatever version of the project the interpreter has installed.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if ! "$python" -c "import pro2sam.model, segment_anything, torch" 2>/dev/null; then
    echo "gpu_check: '$python' cannot import pro2sam and its dependencies; install the project first: cd $repo && $python -m pip install -c constraints.txt -e ." >&2
    exit 2
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$python" -c "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())"

exec timeout --signal=INT --kill-after=20 "$limit_s" "$python" -u "$repo/benchmarks/gpu_check.py" "$@"
