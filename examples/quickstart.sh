#!/usr/bin/env bash
# The main job, on one CPU box: Shakespeare -> SentencePiece tokenizer -> Megatron .bin/.idx ->
# train Memory Mosaics v2 and a GPT baseline of the same size with 2 processes (pipeline
# parallel) -> compare with the unigram baseline -> sample from the Mosaic checkpoint.
# `make quickstart` runs this after installing .venv. Knobs (environment variables):
#   QUICKSTART_ITERS (300)  QUICKSTART_PARALLEL ("--pipeline-model-parallel-size 2")
#   QUICKSTART_DATA (data/shakespeare)  QUICKSTART_RUNS (runs/quickstart)  PYTHON (.venv/bin/python)
#   QUICKSTART_BF16 (0; 1 trains with --bf16: autocast, fp32 master weights, fp32 memory math)
#   QUICKSTART_TRAIN_ONLY (0; 1 stops after training: tools/bench_training.py times the runs)
#   QUICKSTART_MALLOC (1; 0 leaves glibc's malloc thresholds at their defaults, see below)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
DATA=${QUICKSTART_DATA:-data/shakespeare}
RUNS=${QUICKSTART_RUNS:-runs/quickstart}
ITERS=${QUICKSTART_ITERS:-300}
PARALLEL=${QUICKSTART_PARALLEL:---pipeline-model-parallel-size 2}
[ "${QUICKSTART_BF16:-0}" = 1 ] && PARALLEL="$PARALLEL --bf16"
export PYTHONWARNINGS=ignore  # megatron-core warns once per rank about every absent GPU library
# glibc's malloc hands a step's freed activations back to the kernel and faults them in again
# in the next step; fixed thresholds keep them mapped. Measured with tools/bench_training.py
# (README): v2 +9%, GPT +17% tokens/s on this 2-core box. A value already set wins.
if [ "${QUICKSTART_MALLOC:-1}" = 1 ]; then
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-33554432} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1073741824}
fi
START=$SECONDS

step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

step "corpus: Project Gutenberg Shakespeare -> $DATA"
if [ ! -f "$DATA/train.jsonl" ]; then
    "$PY" tools/fetch_corpus.py shakespeare --output "$DATA"
fi

step "tokenizer: SentencePiece BPE, 4096 pieces"
if [ ! -f "$DATA/tokenizer.model" ]; then
    "$PY" tools/train_tokenizer.py --input "$DATA/train.jsonl" --model-prefix "$DATA/tokenizer" \
        --vocab-size 4096
fi

step "preprocess: tokenize into Megatron .bin/.idx (2 workers)"
for split in train valid; do
    if [ ! -f "$DATA/${split}_text_document.idx" ]; then
        "$PY" tools/preprocess_data.py --input "$DATA/$split.jsonl" --output-prefix "$DATA/$split" \
            --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
            --append-eod --workers 2
    fi
done

# The same size for both models: 4 layers, d=128, 4 heads, SwiGLU d'=384, untied embeddings.
# Mosaic v2 memories are scaled to the 256-token context as the paper's are to 4096
# (short-term window 256 -> 64, training delays [64, 256] -> [16, 64], inference delay 64 -> 16).
COMMON=(
    --train-data-path "$DATA/train_text_document" --valid-data-path "$DATA/valid_text_document"
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model"
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 384
    --seq-length 256 --micro-batch-size 2 --global-batch-size 8
    --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 30
    --weight-decay 0.1 --clip-grad 1.0 --seed 1234 --adam-beta2 0.95
    --hidden-dropout 0 --attention-dropout 0 --num-workers 0
    --log-interval 25 --eval-interval 100 --eval-iters 20 --per-position-eval-iters 50 --no-progress-bar
    --short-term-window 64 --long-term-delay-range 16 64 --long-term-inference-delay 16
)
for model in mosaic-v2 gpt; do
    out="$RUNS/$model"
    step "train $model: torchrun --nproc_per_node=2 pretrain_mosaic.py $PARALLEL ($ITERS iterations)"
    rm -rf "$out" && mkdir -p "$out"
    # shellcheck disable=SC2086  # PARALLEL is a list of arguments
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 pretrain_mosaic.py \
        --model "$model" "${COMMON[@]}" $PARALLEL \
        --save "$out/checkpoints" --tensorboard-dir "$out/tensorboard" 2>&1 | tee "$out/train.log"
done

if [ "${QUICKSTART_TRAIN_ONLY:-0}" = 1 ]; then
    step "done in $((SECONDS - START)) s (training only): $RUNS/{mosaic-v2,gpt}/train.log"
    exit 0
fi

step "results (validation loss in nats per token; lower is better)"
"$PY" examples/quickstart_report.py --train "$DATA/train_text_document" \
    --valid "$DATA/valid_text_document" \
    --run "mosaic-v2=$RUNS/mosaic-v2/train.log" --run "gpt=$RUNS/gpt/train.log" \
    --plot "$RUNS/per_position_loss.png"

step "export the Memory Mosaics v2 checkpoint to Hugging Face format -> $RUNS/mosaic-v2/hf"
"$PY" tools/checkpoint/convert_to_hf.py --load "$RUNS/mosaic-v2/checkpoints" --output "$RUNS/mosaic-v2/hf" --overwrite

step "samples through the Hugging Face model (cached decoding; temperature 0.8, top-k 40)"
"$PY" tools/generate.py --load "$RUNS/mosaic-v2/hf" --prompt "ROMEO:" \
    --prompt "Now is the winter of our discontent" --max-new-tokens 60 --temperature 0.8 --top-k 40

step "done in $((SECONDS - START)) s. Where things are:"
echo "  mosaic-v2: Hugging Face model $RUNS/mosaic-v2/hf (AutoModelForCausalLM, trust_remote_code=True)"
echo "  both models: per-position validation loss plot $RUNS/per_position_loss.png"
for model in mosaic-v2 gpt; do
    echo "  $model: checkpoint  $RUNS/$model/checkpoints"
    echo "  $model: log         $RUNS/$model/train.log"
    echo "  $model: tensorboard $RUNS/$model/tensorboard   (tensorboard --logdir $RUNS)"
    echo "  $model: plot        $RUNS/$model/tensorboard/per_position_loss.png (+ .csv)"
done
