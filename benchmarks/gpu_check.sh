#!/usr/bin/env bash
# The GPU check on the bare GPU machine (python3 there has a CUDA torch, accelerate and transformers):
# install the wheels `python benchmarks/gpu_check.py --prepare` put in .whl/ (carried with the tree), then run
# the check from the working tree. Arguments go to gpu_check.py; results land in $OUT (default gpu_check_out/).
#   device run, carry ['.whl']:   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
wheels=${ITR_WHEELS:-.whl}
site=${ITR_SITE:-/tmp/itr-site}
ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "no wheels in $wheels: run python benchmarks/gpu_check.py --prepare here first" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl || exit 2
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ITR_CACHE=${ITR_CACHE:-/tmp/itr-cache} MLFLOW_ENABLE_ASYNC_LOGGING=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
exec python3 benchmarks/gpu_check.py --out "${OUT:-gpu_check_out}" --lengths "$wheels/caption_lengths.txt" "$@"
