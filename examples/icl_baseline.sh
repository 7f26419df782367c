#!/usr/bin/env bash
# The GPT baseline on associative recall alone: after how many steps does it learn it?
# Trains one model (default the GPT baseline of `make icl`: 4 layers, d=128, 4 heads, context
# 128, NullTokenizer vocabulary 512, 32 symbols) on recall documents only, saves a checkpoint
# every BASELINE_SAVE_INTERVAL steps, scores each with tools/evaluate.py (recall at the training
# length, fresh documents) and writes accuracy vs steps (table, CSV, plot) into runs/icl/baseline/,
# then checks the last checkpoint against the least-recently-seen-value shortcut (recency.txt).
# Knobs (environment variables):
#   BASELINE_ITERS (2000)  BASELINE_SAVE_INTERVAL (250)  BASELINE_LR (1e-3)  BASELINE_LAYERS (4)
#   BASELINE_MODEL (gpt)  BASELINE_DOC_UNITS (SEQ_LENGTH - 1: one document + EOD = one sequence)
#   BASELINE_PAIRS (unset: a quarter of the document, 31 pairs at 127 ids; N: N key-value pairs
#     per document, the rest queries; training and evaluation documents alike)
#   BASELINE_QUERY_ORDER (rounds: queries walk permutations of the keys, which lets "the value
#     seen longest ago" guess right; random: each query's key drawn uniformly, with repeats)
#   BASELINE_BATCH (8: sequences per step)
#   BASELINE_EVAL_DOCS (32)  BASELINE_NPROC (1)  BASELINE_RUNS (runs/icl/baseline)
#   BASELINE_TRAIN_DOCS (50000)  ICL_SEQ_LENGTH (128)  ICL_VOCAB (512)  ICL_SYMBOLS (32)  ICL_DATA (data/icl)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
LEN=${ICL_SEQ_LENGTH:-128}
VOCAB=${ICL_VOCAB:-512}
SYMBOLS=${ICL_SYMBOLS:-32}
TRAIN_DOCS=${BASELINE_TRAIN_DOCS:-50000}  # fresh documents: 8 x ITERS sequences see each a few times at most
DATA=${ICL_DATA:-data/icl}
ITERS=${BASELINE_ITERS:-2000}
SAVE=${BASELINE_SAVE_INTERVAL:-250}
LR=${BASELINE_LR:-1e-3}
LAYERS=${BASELINE_LAYERS:-4}
MODEL=${BASELINE_MODEL:-gpt}
UNITS=${BASELINE_DOC_UNITS:-$((LEN - 1))}
PAIRS=${BASELINE_PAIRS:-}
BATCH=${BASELINE_BATCH:-8}
ORDER=${BASELINE_QUERY_ORDER:-rounds}
case "$ORDER" in rounds|random) ;; *) echo "BASELINE_QUERY_ORDER must be rounds or random, got $ORDER"; exit 1;; esac
PAIRS_ARG=(${PAIRS:+--num-pairs "$PAIRS"})
[ "$ORDER" = rounds ] || PAIRS_ARG+=(--query-order "$ORDER")
EVAL_DOCS=${BASELINE_EVAL_DOCS:-32}
NPROC=${BASELINE_NPROC:-1}
RUNS=${BASELINE_RUNS:-runs/icl/baseline}
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
START=$SECONDS
step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

# Recall documents of UNITS ids each, EOD appended by preprocessing. With UNITS = LEN - 1 a
# document is exactly one training sequence; with UNITS = LEN (what icl.sh wrote before) every
# sequence starts inside a document, and most queries lose the pairs they ask about.
prefix="$DATA/recall_u${UNITS}_n${TRAIN_DOCS}_s${SYMBOLS}_v${VOCAB}${PAIRS:+_p$PAIRS}$([ "$ORDER" = rounds ] || echo "_q$ORDER")"
step "data: $TRAIN_DOCS recall documents of $UNITS ids (+ EOD), vocabulary $VOCAB, $SYMBOLS symbols, ${PAIRS:-$((UNITS / 4)) (default)} pairs, $ORDER query order"
for split in train valid; do
    out="${prefix}_$split"
    [ -f "${out}_text_document.idx" ] && continue
    seed=$([ "$split" = train ] && echo 1 || echo 2)
    docs=$([ "$split" = train ] && echo "$TRAIN_DOCS" || echo 200)
    mkdir -p "$DATA"
    "$PY" tools/make_eval_data.py recall --seed "$seed" --num-docs "$docs" --length "$UNITS" \
        --vocab-size "$VOCAB" --num-symbols "$SYMBOLS" "${PAIRS_ARG[@]}" --output "$out.jsonl" 2>/dev/null
    "$PY" tools/preprocess_data.py --input "$out.jsonl" --output-prefix "$out" \
        --tokenizer-type NullTokenizer --vocab-size "$VOCAB" --append-eod --workers 1 >/dev/null
done

run="$RUNS/$MODEL"
step "train $MODEL ($LAYERS layers) on recall alone: $ITERS iterations of $BATCH sequences, lr $LR, checkpoint every $SAVE"
rm -rf "$run" && mkdir -p "$run"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" pretrain_mosaic.py \
    --model "$MODEL" --train-data-path "${prefix}_train_text_document" --valid-data-path "${prefix}_valid_text_document" \
    --tokenizer-type NullTokenizer --vocab-size "$VOCAB" \
    --num-layers "$LAYERS" --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 384 \
    --seq-length "$LEN" --micro-batch-size "$((BATCH / NPROC))" --global-batch-size "$BATCH" \
    --train-iters "$ITERS" --lr "$LR" --min-lr "$(awk "BEGIN{print $LR/10}")" --lr-decay-style cosine \
    --lr-warmup-iters "$((ITERS / 20))" --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234 \
    --hidden-dropout 0.0 --attention-dropout 0.0 --num-workers 0 \
    --log-interval 50 --eval-interval 100000 --eval-iters 4 --no-progress-bar \
    --short-term-window "$((LEN / 4))" --long-term-delay-range "$((LEN / 16))" "$((LEN / 4))" \
    --long-term-inference-delay "$((LEN / 16))" \
    --save "$run/checkpoints" --save-interval "$SAVE" > "$run/train.log" 2>&1 \
    || { tail -20 "$run/train.log"; echo "training $MODEL failed"; exit 1; }
grep -E "iteration .*/" "$run/train.log" | awk 'NR % 4 == 0' || true

step "evaluate every checkpoint on recall at $LEN tokens ($EVAL_DOCS fresh documents, seed 4321)"
for ckpt in "$run"/checkpoints/iter_*; do
    it=$((10#${ckpt##*iter_}))
    "$PY" tools/evaluate.py --load "$ckpt" --task recall --name "$MODEL@$it" --seq-length "$LEN" \
        --num-docs "$EVAL_DOCS" --num-symbols "$SYMBOLS" "${PAIRS_ARG[@]}" --threads 1 --output "$run/eval/$it" > /dev/null
done
"$PY" examples/icl_baseline_report.py --run "$run" --name "$MODEL" \
    --note "$LAYERS layers, recall documents of $UNITS ids (${PAIRS:-$((UNITS / 4))} pairs, $ORDER query order) + EOD in $LEN-token sequences, $BATCH sequences/step, lr $LR"
last=$(ls -d "$run"/checkpoints/iter_* | tail -1)
step "the last checkpoint against a shortcut: the least recently seen value (right often when queries walk permutations of the keys, by chance when random)"
"$PY" examples/icl_baseline_report.py --run "$run" --recency "$last" --num-symbols "$SYMBOLS" "${PAIRS_ARG[@]}" \
    2>/dev/null | tee "$run/recency.txt"
step "done in $((SECONDS - START)) s: $run/steps.md"
