"""An independent cross-check of the GPT baseline's learning curve on recall: the same data and
recipe through Hugging Face's LlamaForCausalLM and a plain PyTorch AdamW loop (no Megatron).

    python examples/icl_baseline_reference.py --data data/icl/recall_u127_n50000_s32_v512 --steps 2000

If this model learns recall much sooner than ``examples/icl_baseline.sh``'s GPT (same sizes,
lr schedule, batch, data), the Megatron training path is at fault; if both stay on the same
plateau, the recipe is. Every document of ``--data`` must be ``--seq-length`` tokens with its
EOD (icl_baseline.sh writes them so), so one row is one document and no masking is needed.
Prints the training loss and recall accuracy (argmax on the answer of every query whose key
appeared earlier in the document, on the held-out ``_valid`` documents) at intervals.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from tools._cli import cli_error  # noqa: E402

NUM_RESERVED = 8  # megatron_mosaic.evaluation.vocab: ids [8, 8+S) are keys, [8+S, 8+2S) values


def load_rows(prefix: str, seq_length: int) -> torch.Tensor:
    """(documents, seq_length) token ids of an indexed dataset whose documents all fit a row."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    lengths = set(int(n) for n in data.sequence_lengths)
    if lengths != {seq_length}:
        raise ValueError(f"--data {prefix}: documents of {sorted(lengths)[:5]} tokens, need exactly {seq_length}")
    return torch.stack([torch.as_tensor(data[i].astype("int64")) for i in range(len(data))])


def recall_accuracy(model, rows: torch.Tensor, symbols: int) -> float:
    """Argmax accuracy on values that follow a key already seen in the row (the queries)."""
    keys = (rows >= NUM_RESERVED) & (rows < NUM_RESERVED + symbols)
    with torch.no_grad():
        predicted = model(input_ids=rows).logits[:, :-1].argmax(-1)
    correct = total = 0
    for r in range(rows.shape[0]):
        seen = set()
        for p in range(rows.shape[1] - 1):
            if keys[r, p]:
                token = int(rows[r, p])
                if token in seen:
                    total += 1
                    correct += int(predicted[r, p] == rows[r, p + 1])
                seen.add(token)
    return correct / max(total, 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="icl_baseline_reference", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", required=True, help="PREFIX: PREFIX_train_text_document and PREFIX_valid_text_document")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512, help="NullTokenizer's N (EOD = N)")
    p.add_argument("--num-symbols", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=384)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-docs", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        train = load_rows(f"{args.data}_train_text_document", args.seq_length)
        valid = load_rows(f"{args.data}_valid_text_document", args.seq_length)[:args.eval_docs]
    except (ValueError, FileNotFoundError) as err:
        return cli_error("icl_baseline_reference", str(err))
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab_size + 1, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=args.seq_length,
                         tie_word_embeddings=False, initializer_range=0.02, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    params = sum(t.numel() for t in model.parameters())
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)  # as icl_baseline.sh: warmup 5%, cosine to lr / 10

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr / 10 + 0.5 * (args.lr - args.lr / 10) * (1 + math.cos(math.pi * progress))

    print(f"LlamaForCausalLM: {params:,} parameters; {len(train)} training documents of {args.seq_length} tokens")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    start, losses = time.time(), []
    for step in range(args.steps):
        idx = order[(torch.arange(args.batch) + step * args.batch) % len(train)]
        rows = train[idx]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=rows, labels=rows).loss  # HF shifts the labels by one
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            model.eval()
            accuracy = recall_accuracy(model, valid, args.num_symbols)
            model.train()
            mean = sum(losses) / len(losses)
            losses = []
            print(f"step {step + 1:6d} | loss {mean:.4f} | recall accuracy {accuracy:.3f} | {time.time() - start:.0f} s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
