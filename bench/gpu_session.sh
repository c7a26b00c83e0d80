#!/usr/bin/env bash
# Issue 15's GPU checks on a lent GPU machine, in two device-tool calls back to back (see
# bench/gpu_pack.py, which fills .gpu/ on the development machine first):
#   bash bench/gpu_session.sh install   the carried wheels beside the image's PyTorch, wrk, the weights
#   bash bench/gpu_session.sh run       the CUDA tests, then the serving and training benches
# Each step of `run` has its own time limit, so one that overruns still leaves the others' figures.
# Logs go to $OUT (the device tool brings them back), or .gpu/out elsewhere.
set -uo pipefail
cd "$(dirname "$0")/.."
site=/tmp/visiontune-site tools=/tmp/visiontune-tools shared=/tmp/visiontune-shared

case "${1:-}" in
install)
  set -e
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/wheels/*.whl
  mkdir -p "$tools" "$shared/weights"
  for deb in .gpu/deb/*.deb; do dpkg -x "$deb" "$tools"; done
  cp .gpu/shared/weights/*.safetensors "$shared/weights/"
  PYTHONPATH="$site:$PWD" python3 -c "import app.main, workers.celery_app; print('the service imports')"
  ;;
run)
  out=${OUT:-.gpu/out}
  mkdir -p "$out"
  export PYTHONPATH="$site:$PWD:$PWD/clients/python/src" PYTHONUNBUFFERED=1
  export PATH="$tools/usr/bin:$PATH" LD_LIBRARY_PATH="$tools/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  ln -sfn "$PWD/.gpu/shared/datasets" "$shared/datasets"
  [ -e ../shared ] || ln -s "$shared" ../shared  # where the tests read the weights and photos
  export VISIONTUNE_SHARED_DIR="$shared"  # where the benches read them
  { nvidia-smi -L; nproc; python3 -c "import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/machine.txt"
  timeout 100 python3 -m pytest -p no:cacheprovider -q -o addopts="" --durations=10 \
    tests/serving tests/ml/test_tensor_augment.py tests/ml/test_train.py -k "gpu or cuda or inference or device_decode" \
    2>&1 | tee "$out/tests.txt"
  # The GPU's use and memory each second beside serve_wrk's rows: whether the GPU is what limits a
  # row, and whether nvjpeg's memory stays level under load (`--decode device`).
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$out/gpu_use.csv" 2>&1 &
  sampler=$!
  # One model (PyTorch serves it: no exports), trained once for both runs. First the forward passes
  # in each API process against one inference process; then, with the inference process, JPEGs
  # decoded by nvjpeg there at the GPU's default largest batch (32) and at the CPU's (8).
  wrk_args=(--data-dir /tmp/visiontune-bench --api-workers 15 --clients 64 --seconds 12 --warmup 10 --runtimes torch --bodies raw)
  timeout 185 python3 bench/serve_wrk.py "${wrk_args[@]}" --inference-process off,on --decode api 2>&1 | tee "$out/serve_wrk.txt"
  timeout 135 python3 bench/serve_wrk.py "${wrk_args[@]}" --inference-process on --decode device --max-batch-sizes default,8 \
    2>&1 | tee "$out/serve_wrk_device.txt"
  kill "$sampler"
  timeout 140 python3 bench/full_throughput.py --device cuda --epochs 3 --repeat 8 2>&1 | tee "$out/full_throughput.txt"
  ;;
*)
  echo "usage: bash bench/gpu_session.sh install|run" >&2
  exit 2
  ;;
esac
