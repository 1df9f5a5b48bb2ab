#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see README "GPU"): checks that the CUDA
# paths run (train --device cuda, worker --device cuda, evaluate) and measures them.
# Expects the wheels medsim needs beyond the machine's own PyTorch in .whl/ and the
# MedMNIST files in .gpudata/.
set -uo pipefail
export PYTHONUNBUFFERED=1 MEDSIM_HOME=/tmp/medsim-gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
M="python3 -m medsim.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())"
$M db start && python3 -m alembic upgrade head 2>&1 | tail -1
$M ingest breastmnist retinamnist pneumoniamnist --data-dir .gpudata --accept-unofficial --quiet
echo "## default preset, label mode, --device cuda"
$M train --device cuda --quiet
echo "## seed preset (128 px), dataset mode, --device cuda"
$M train --device cuda --preset seed --mode dataset --epochs 4 --quiet --no-set-current
echo "## worker --device cuda (current = default model)"
python3 -m medsim.embed_worker --once --device cuda --quiet --batch-size 1024 2>&1 | grep -v INFO
$M evaluate --device cuda
echo "## worker benchmark on cuda (a)/(b)/(c)"
python3 bench/bench_worker.py --device cuda --data-dir .gpudata --batch-size 1024
python3 bench/bench_worker.py --device cuda --data-dir .gpudata --batch-size 1024 --preset seed --skip-notebook
