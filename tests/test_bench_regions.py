"""tools/bench_regions.py measures what it says: every stand-in replaces a name the v2 layer
really calls (a renamed function would otherwise be timed as free without being replaced), the
layer's output changes while it is replaced, and the original is back afterwards."""

from __future__ import annotations

import sys

import pytest
import torch

from megatron_mosaic.training.initialize import single_rank_megatron
from tools import bench_regions
from tools.layer_benchmark import build, tokens_for


@pytest.mark.parametrize("region", list(bench_regions.REGIONS))
def test_each_stand_in_replaces_a_function_the_v2_layer_calls(region):
    module_name, name, stand_in = bench_regions.REGIONS[region]
    module = sys.modules[module_name]
    original = getattr(module, name)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return stand_in(*args, **kwargs)

    with single_rank_megatron(seed=0):
        model = build("v2", 32, 2, 8, 4)
        tokens = tokens_for(2, 32, packed=True)
        with torch.no_grad():
            before = model(tokens, long_term_delay=4)
            bench_regions.REGIONS[region] = (module_name, name, counting)
            try:
                with bench_regions.replaced(region):
                    during = model(tokens, long_term_delay=4)
            finally:
                bench_regions.REGIONS[region] = (module_name, name, stand_in)
            after = model(tokens, long_term_delay=4)
    assert calls, f"the v2 layer never called {module_name}.{name}"
    assert during.shape == before.shape and not torch.equal(during, before)
    assert getattr(module, name) is original and torch.equal(after, before)
