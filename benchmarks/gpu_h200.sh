#!/usr/bin/env bash
# One prepared GPU check (issues 7, 12), <= 6 minutes on an H200: ViT-B/16 bf16 train at batch
# 256 under the mixed-precision policy (bf16 operands, fp32 accumulation; MFU against the policy's
# own bf16->fp32 matmul peak measured on the spot; scanned layers), with the attention core as
# cuDNN flash attention, XLA's dot_product_attention and our explicit heads-major matmuls, vs
# timm with torch.compile + AMP bf16 on the same GPU.
# Usage on the device machine, from the repo root:  bash benchmarks/gpu_h200.sh "$OUT"
set -euo pipefail
OUT=${1:-/tmp/gpu_bench}
mkdir -p "$OUT"
python3 -m venv /tmp/vj && . /tmp/vj/bin/activate
pip install -q -U "jax[cuda12]" && pip install -q -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
for impl in cudnn xla explicit; do
  timeout 110 python -m vit_jax.benchmark --architecture ViT-B_16 --batch 256 --resolution 224 \
    --mode train --dtype bfloat16 --steps 20 --scan --json \
    --attention $impl | tee -a "$OUT/vit_jax.jsonl" || true
done
# timm on the image's own torch (no TensorFlow imported in this process).
deactivate
timeout 150 python3 benchmarks/timm_bench.py --model vit_base_patch16_224 --batch 256 \
  --mode train --dtype bfloat16 --compile --steps 20 --device cuda | tee "$OUT/timm.jsonl" || true
