set -uo pipefail
export PYTHONUNBUFFERED=1 MEDSIM_HOME=/tmp/medsim-gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
for bs in 1024 4096; do
  echo "## batch $bs"
  python3 bench/bench_worker.py --device cuda --data-dir .gpudata --batch-size $bs --skip-notebook 2>&1 | grep -v -i warn
done
