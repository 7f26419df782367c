#!/usr/bin/env bash
# In-context learning, side by side: train Memory Mosaics v1, v2 and a GPT baseline of the same
# size on a blend of synthetic in-context tasks and real text (NullTokenizer ids), evaluate each
# at 1x, 4x and 8x the training length, and write one report into runs/icl/.
# Knobs (environment variables):
#   ICL_ITERS (800)  ICL_SEQ_LENGTH (128)  ICL_VOCAB (512)  ICL_SYMBOLS (32)  ICL_TRAIN_DOCS (3000)
#   ICL_EVAL_DOCS (8)  ICL_MODELS ("mosaic-v1 mosaic-v2 gpt")  ICL_NPROC (2)
#   ICL_DATA (data/icl)  ICL_RUNS (runs/icl)  SHAKESPEARE (data/shakespeare)  PYTHON (.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
DATA=${ICL_DATA:-data/icl}
RUNS=${ICL_RUNS:-runs/icl}
TEXT=${SHAKESPEARE:-data/shakespeare}
ITERS=${ICL_ITERS:-800}
LEN=${ICL_SEQ_LENGTH:-128}
VOCAB=${ICL_VOCAB:-512}
SYMBOLS=${ICL_SYMBOLS:-32}  # keys and values per set: few, so their embeddings train in minutes
TRAIN_DOCS=${ICL_TRAIN_DOCS:-3000}
EVAL_DOCS=${ICL_EVAL_DOCS:-8}
MODELS=${ICL_MODELS:-mosaic-v1 mosaic-v2 gpt}
NPROC=${ICL_NPROC:-2}
export PYTHONWARNINGS=ignore  # megatron-core warns once per rank about every absent GPU library
START=$SECONDS

step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

step "corpus: Project Gutenberg Shakespeare -> $TEXT"
if [ ! -f "$TEXT/train.jsonl" ]; then
    "$PY" tools/fetch_corpus.py shakespeare --output "$TEXT"
fi

# Training documents (seed 1) at the training length, in NullTokenizer ids: recall and few-shot
# are synthetic; multidoc plants facts in Shakespeare passages; lm is plain Shakespeare (words
# hashed into the vocabulary). Validation is held-out Shakespeare (valid.jsonl). Evaluation
# (tools/evaluate.py, seed 4321) draws fresh documents, and its real text is valid.jsonl.
# A document is LEN - 1 ids and the EOD preprocessing appends: exactly one training sequence.
# (Documents of LEN ids made every sequence start inside a document: half the recall queries
# and most multidoc questions were trained without the pairs or facts they ask about.)
step "data: $TRAIN_DOCS documents per task, $((LEN - 1)) ids + EOD, vocabulary $VOCAB (NullTokenizer, EOD = $VOCAB)"
mkdir -p "$DATA"
data() { echo "$DATA/${1}_l$((LEN - 1))_v${VOCAB}_s${SYMBOLS}_n${TRAIN_DOCS}"; }  # made again when a knob changes
for task in recall fewshot multidoc lm valid; do
    prefix=$(data "$task")
    if [ -f "${prefix}_text_document.idx" ]; then continue; fi
    case $task in
        multidoc|lm) gen=("$task" --text "$TEXT/train.jsonl") ;;
        # Long validation documents: the per-position pass at --eval-seq-length needs
        # sequences that are one document, not several short ones packed.
        valid) gen=(lm --text "$TEXT/valid.jsonl" --length "$((8 * LEN - 1))" --num-docs 200) ;;
        *) gen=("$task") ;;
    esac
    "$PY" tools/make_eval_data.py --seed 1 --num-docs "$TRAIN_DOCS" --length "$((LEN - 1))" --vocab-size "$VOCAB" \
        --num-symbols "$SYMBOLS" --output "$prefix.jsonl" "${gen[@]}" >/dev/null 2>"$prefix.log" \
        || { cat "$prefix.log" >&2; exit 1; }  # its one-line error, without the progress lines
    "$PY" tools/preprocess_data.py --input "$prefix.jsonl" --output-prefix "$prefix" \
        --tokenizer-type NullTokenizer --vocab-size "$VOCAB" --append-eod --workers 2 >/dev/null
done

# One size for all three: 4 layers, d=128, 4 heads, SwiGLU 384 (v2, gpt); v1's persistent memory
# matches the parameter count. v2's memories are scaled to the context as in the quickstart.
COMMON=(
    --train-data-path 0.35 "$(data recall)_text_document" 0.2 "$(data fewshot)_text_document"
                      0.2 "$(data multidoc)_text_document" 0.25 "$(data lm)_text_document"
    --valid-data-path "$(data valid)_text_document"
    --tokenizer-type NullTokenizer --vocab-size "$VOCAB"
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 384
    --seq-length "$LEN" --eval-seq-length "$((8 * LEN))" --micro-batch-size 4 --global-batch-size 8
    --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters "$((ITERS / 10))"
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234
    --hidden-dropout 0.0 --attention-dropout 0.0 --num-workers 0
    --log-interval 50 --eval-interval 100000 --eval-iters 10 --per-position-eval-iters 4 --no-progress-bar
    --short-term-window "$((LEN / 4))" --long-term-delay-range "$((LEN / 16))" "$((LEN / 4))"
    --long-term-inference-delay "$((LEN / 16))"
)
for model in $MODELS; do
    out="$RUNS/$model"
    step "train $model: $NPROC processes (data parallel), $ITERS iterations"
    rm -rf "$out" && mkdir -p "$out"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" pretrain_mosaic.py \
        --model "$model" "${COMMON[@]}" \
        --save "$out/checkpoints" --tensorboard-dir "$out/tensorboard" 2>&1 | tee "$out/train.log" \
        | grep --line-buffered -E "iteration .*/|final|validation|error" || true
    [ -f "$out/checkpoints/latest_checkpointed_iteration.txt" ] || { echo "training $model failed"; exit 1; }
done

for model in $MODELS; do
    step "evaluate $model on every task at $LEN, $((4 * LEN)), $((8 * LEN)) tokens ($EVAL_DOCS documents each)"
    "$PY" tools/evaluate.py --load "$RUNS/$model/checkpoints" --task recall fewshot multidoc lm \
        --name "$model" --seq-length "$LEN" "$((4 * LEN))" "$((8 * LEN))" --num-docs "$EVAL_DOCS" \
        --num-symbols "$SYMBOLS" --text "$TEXT/valid.jsonl" --output "$RUNS/$model/eval" > "$RUNS/$model/eval.txt"
done

step "report"
# shellcheck disable=SC2086  # MODELS is a list
"$PY" examples/icl_report.py --runs "$RUNS" --models $MODELS
step "done in $((SECONDS - START)) s: $RUNS/report.md"
