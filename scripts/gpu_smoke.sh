#!/usr/bin/env bash
# On the GPU machine (torch 2.11 + CUDA, transformers 5.17, no fairseq): install the carried wheels,
# run the CPU test subset under that version set, then the default finetune on the GPU in fp32 and fp16.
# Results go to $OUT. Usage (device tool): bash scripts/gpu_smoke.sh   (carry .whl)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, fairseq; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'fairseq', fairseq.__version__)" | tee -a "$OUT/gpu.txt"
for precision in fp32 fp16; do
    extra=(); [[ $precision == fp16 ]] && extra=(--fp16)
    start=$(date +%s)
    OUTPUT_DIR=/tmp/run_$precision PYTHON=python3 bash cube_examples/finetune_hf_model/run.sh "${extra[@]}" \
        > "$OUT/run_$precision.txt" 2>&1
    echo "$precision: rc=$? wall=$(( $(date +%s) - start ))s $(grep -E 'exact match \(after\)' "$OUT/run_$precision.txt")" | tee -a "$OUT/gpu.txt"
    grep -E "done training|num_updates=2000" "$OUT/run_$precision.txt" | tail -2 | tee -a "$OUT/gpu.txt"
done
timeout 420 python3 -m pytest -q -x tests/unit tests/integration/test_fairseq_train.py tests/integration/test_lora.py \
    tests/distributed/test_tensor_parallel.py 2>&1 | tail -25 > "$OUT/pytest.txt"
tail -3 "$OUT/pytest.txt" | tee -a "$OUT/gpu.txt"
