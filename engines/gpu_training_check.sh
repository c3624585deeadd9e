#!/usr/bin/env bash
# The training checks of docs/training.md on one CUDA GPU (PyTorch, transformers and peft; no
# TensorRT, no downloads: random weights, a generated tokenizer and a generated page):
#   1. the CUDA tests of the training code (FSDP2 bf16 on a 1-rank nccl group with resume, LoRA on a
#      bf16 base with checkpointing, the memory measurement on the tiny width);
#   2. device memory of stage-2 steps at the released widths (python -m hiwin_model.train.memory
#      measure-cuda): LoRA r=128 on the full 7B (32 Llama layers); LoRA and full bf16 (FSDP2 at world
#      size 1) with 2 Llama layers; then full bf16 on the full 7B, which needs ~110 GiB before
#      activations (an H200 may hold it; an out-of-memory failure is recorded in its log and JSON).
# Results (logs + JSON, flat files) go to the folder given as $1 (default: ./gpu-training-checks).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-training-checks}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
status=0
python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::FutureWarning -rs \
  tests/model/test_training_dist.py tests/model/test_training_memory.py -k cuda 2>&1 | tee "$out/pytest-cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
run() {  # name, then measure-cuda arguments
  local name="$1"; shift
  python3 -m hiwin_model.train.memory measure-cuda "$@" --json "$out/mem-$name.json" 2>&1 | tee "$out/mem-$name.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
run lora-32layers --llm-layers 32 --lora-r 128 --modes lora
run 2layers --llm-layers 2 --lora-r 128 --modes lora,full-bf16
run full-bf16-32layers --llm-layers 32 --modes full-bf16
exit $status
