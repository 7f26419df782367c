"""Build a Memory Mosaics v1 and v2 model from Python and run one forward pass each.

    python examples/build_models.py

Megatron-Core modules need torch.distributed and parallel_state, even on one CPU process.
The README quotes this file; tests/test_examples.py runs it.
"""

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mosaic.model import MosaicConfig, MosaicModel, sample_long_term_delay

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29511")
dist.init_process_group("gloo", rank=0, world_size=1)
parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)

VOCAB, EOD = 512, 0
tokens = torch.randint(1, VOCAB, (2, 128))
tokens[:, 60] = EOD  # two documents per row: memories never cross the EOD
labels = tokens.roll(-1, dims=1)

# v1 (Memory Mosaics): contextual memory + persistent memory, LayerNorm, tied output layer.
v1 = MosaicModel(
    MosaicConfig(mosaic_version=1, num_layers=2, hidden_size=64, num_attention_heads=4,
                 persistent_memory_size=224, use_cpu_initialization=True),
    vocab_size=VOCAB, eod_token_id=EOD,
)
# v2 (Memory Mosaics at scale): short-term (window h) + long-term (delay m) memory with adaptive
# bandwidth and gated keys, SwiGLU persistent memory, RMSNorm, untied output layer.
v2 = MosaicModel(
    MosaicConfig(mosaic_version=2, num_layers=2, hidden_size=64, num_attention_heads=4,
                 ffn_hidden_size=192, short_term_window=32, long_term_delay_range=(16, 64),
                 long_term_inference_delay=16, use_cpu_initialization=True),
    vocab_size=VOCAB, eod_token_id=EOD,
)

loss_v1 = v1(tokens, labels=labels)  # (B, T) per-token loss
step, seed = 0, 1234
m = sample_long_term_delay(seed, step, *v2.config.long_term_delay_range)  # same on every rank
loss_v2 = v2(tokens, labels=labels, long_term_delay=m)
(loss_v1.mean() + loss_v2.mean()).backward()
logits = v2.eval()(tokens)  # (B, T, V / TP); eval uses the inference delay

for name, model, loss in (("v1", v1, loss_v1), ("v2", v2, loss_v2)):
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params:,} parameters, initial loss {loss.mean().item():.3f} nats/token")
print(f"v2 delay for step {step}: m = {m}; eval logits {tuple(logits.shape)}")

parallel_state.destroy_model_parallel()
dist.destroy_process_group()
