"""Host syncs per micro-batch do not grow with depth: the per-batch facts the layers branch on
(single document, consecutive positions) are Python values computed once per layout and
shared, not a ``bool(tensor)`` per layer (on a GPU each one stalls the launch queue).

A dispatch mode counts the ops that hand a tensor's value to the host (``.item()``,
``bool(tensor)``, ``torch.equal``) during one forward + backward with packed documents.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mosaic.model import MosaicModel, build_gpt_baseline
from tests.model.helpers import EOD, VOCAB, packed_tokens, single_rank_megatron, tiny_config, tiny_gpt_config

SYNCS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _syncs(kind: str, layers: int) -> int:
    with single_rank_megatron(seed=0):
        if kind == "gpt":
            model = build_gpt_baseline(tiny_gpt_config(num_layers=layers), VOCAB, eod_token_id=EOD)
        else:
            model = MosaicModel(tiny_config(1 if kind == "v1" else 2, num_layers=layers), VOCAB, eod_token_id=EOD)
        tokens = packed_tokens(torch.Generator().manual_seed(0), seq=32)
        counter = SyncCounter()
        with counter:
            model(tokens, labels=tokens, long_term_delay=3).sum().backward()
    return counter.count


@pytest.mark.parametrize("kind", ["v1", "v2", "gpt"])
def test_host_syncs_per_micro_batch_do_not_grow_with_layers(kind):
    shallow, deep = _syncs(kind, 1), _syncs(kind, 4)
    assert deep == shallow, f"{kind}: {shallow} host syncs with 1 layer, {deep} with 4: a per-layer sync"
    assert shallow <= 2, f"{kind}: {shallow} host syncs per micro-batch"  # measured: 2 (the layout facts)
