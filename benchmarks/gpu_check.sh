#!/usr/bin/env bash
# GPU correctness and throughput in one short run (about 7 minutes on one H200).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. tests/test_gpu.py (marker gpu): every method's loss and gradients on CUDA against the CPU in
#    fp32 and under bf16 autocast, fused attention kernels against the explicit path, a run
#    stopped and resumed on the GPU against an uninterrupted one, a GPU checkpoint evaluated on
#    the CPU and on the GPU.
# 2. `mae-bench speed` side by side on the GPU: every method on ViT-Small/4 (32 px) in bf16 with
#    MAE in fp32 too, and MAE against MAE [M] (mask tokens in the encoder) on ViT-Base/16 at 224 px,
#    the paper's model. Rows go to OUT_DIR/results, tables to OUT_DIR/*.md.
# 3. The streamed data path on the GPU (`speed --data-only`, 4 and 8 workers, each pipeline, dali
#    where NVIDIA DALI is installed) on
#    4,096 generated ImageNet-sized JPEGs, and MAE ViT-B/16 at 224 px trained end to end from
#    those files with nvJPEG decoding (its images/s in OUT_DIR/e2e-mae-vit_base_patch16).
#
# Everything it prints is also in OUT_DIR/gpu-check.log. Needs a CUDA device, torch, and the
# package's dependencies importable (installed, or on PYTHONPATH with the repository root).
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
{
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$py" -c "import torch, timm, faiss; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'faiss', faiss.__version__, torch.cuda.get_device_name())" || status=1

  step "GPU correctness: tests/test_gpu.py"
  "$py" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider -rs --durations=8 || status=1

  step "throughput: every method, ViT-Small/4, batch 256, bf16 (MAE in fp32 too)"
  "$py" -m mae_bench speed --device cuda --arch vit_small_patch4 --batch-size 256 \
    --precisions bf16,fp32 --steps 10 --warmup 3 --rounds 3 --train-images 4096 \
    --eval-images 8192 --results-dir "$out/results" \
    --markdown "$out/speed-vit_small_patch4.md" || status=1

  step "throughput: MAE vs MAE [M], ViT-Base/16 at 224 px, batch 128, bf16"
  "$py" -m mae_bench speed --device cuda --arch vit_base_patch16 --methods mae --batch-size 128 \
    --precisions bf16 --steps 10 --warmup 3 --rounds 3 --train-images 1024 --eval-images 2048 \
    --knn-train 0 --knn-test 0 --no-probe --results-dir "$out/results" \
    --markdown "$out/speed-vit_base_patch16-mae.md" || status=1
  step "data path: workers decode and crop, the GPU resizes (device-resize) or decodes (device-decode)"
  jpegs=$("$py" -c "from mae_bench.data.sample_photos import make_jpeg_folder as m; \
print(m('$out/jpegs', n_images=4096).root)") || status=1
  pipelines="device-resize device-decode"
  if "$py" -c "import nvidia.dali" 2>/dev/null; then
    pipelines="$pipelines dali"
  else
    echo "NVIDIA DALI is not installed here: --pipeline dali not measured (pip install 'mae-bench[dali]')"
  fi
  for pipeline in $pipelines; do
    "$py" -m mae_bench speed --data-only --device cuda --data-dir "$jpegs" --workers 4,8 \
      --pipeline "$pipeline" --batch-size 128 --images 2048 --rounds 2 \
      --markdown "$out/data-path-$pipeline.md" || status=1
  done

  step "end to end: MAE ViT-B/16 at 224 px from JPEG files, nvJPEG decode, 8 workers"
  "$py" -m mae_bench pretrain --method mae --arch vit_base_patch16 --dataset imagefolder \
    --data-dir "$jpegs" --stream --pipeline device-decode --num-workers 8 --epochs 3 \
    --batch-size 128 --device cuda --precision bf16 --log-every 8 --no-online-eval \
    --no-progress --out "$out/e2e-mae-vit_base_patch16" || status=1
  step "done, status $status"
  exit "$status"
} 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
