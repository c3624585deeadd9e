#!/usr/bin/env bash
# The GPU checks of this repository, in one run (a CUDA machine with nvcc and PyTorch; TensorRT is
# not needed): the plugins' CUDA launchers against the PyTorch reference (parity + timing), then the
# vision path's forms (released / fast / exported) in PyTorch on the GPU, fp32 and bf16, two image
# sizes. Results (markdown logs + JSON) go to the folder given as $1 (default: ./gpu-checks).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
status=0
python3 engines/plugins/gpu_check.py --out "$out/plugins.json" 2>&1 | tee "$out/plugins.md" || status=1
for dtype in fp32 bf16; do
  for size in "1008 672" "336 336"; do
    set -- $size
    python3 -m hiwin_model.bench --forms --device cuda --dtype "$dtype" --width "$1" --height "$2" --repeats 5 \
      --json "$out/forms-$dtype-$1x$2.json" 2>&1 | tee "$out/forms-$dtype-$1x$2.md" || status=1
  done
done
exit $status
