"""SequenceLayout against the loop reference and its documented helpers."""

import pytest
import torch

from megatron_mosaic.memory import SequenceLayout
from megatron_mosaic.memory import reference as ref
from tests.memory.helpers import EOD, random_tokens


@pytest.mark.parametrize("seq_len,eod_prob", [(1, 0.5), (7, 0.3), (33, 0.1), (40, 0.0), (20, 0.9)])
def test_from_tokens_matches_reference(seq_len, eod_prob):
    gen = torch.Generator().manual_seed(seq_len)
    tokens = random_tokens(3, seq_len, eod_prob, gen)
    layout = SequenceLayout.from_tokens(tokens, EOD)
    positions, doc_starts = ref.layout_from_tokens(tokens, EOD)
    assert torch.equal(layout.positions, positions)
    assert torch.equal(layout.doc_starts, doc_starts)
    assert layout.total_length == seq_len
    assert torch.equal(layout.resets, positions == doc_starts)
    assert layout.single_document == bool((doc_starts == 0).all())


def test_eod_belongs_to_the_document_it_ends():
    tokens = torch.tensor([[5, EOD, 6, 7, EOD, EOD, 8]])
    layout = SequenceLayout.from_tokens(tokens, EOD)
    assert layout.doc_starts.tolist() == [[0, 0, 2, 2, 2, 5, 6]]
    assert layout.resets.tolist() == [[True, False, True, False, False, True, True]]
    assert not layout.single_document
    # A trailing EOD does not start anything inside the sequence.
    assert SequenceLayout.from_tokens(torch.tensor([[5, 6, EOD]]), EOD).single_document


def test_contiguous_and_index_select():
    layout = SequenceLayout.contiguous(2, 6)
    assert layout.positions.tolist() == [list(range(6))] * 2
    assert layout.single_document and layout.resets[:, 0].all() and not layout.resets[:, 1:].any()
    part = SequenceLayout.from_tokens(torch.tensor([[1, 2, EOD, 3, 4, 5]]), EOD).index_select(torch.tensor([4, 5, 0]))
    assert part.positions.tolist() == [[4, 5, 0]]
    assert part.doc_starts.tolist() == [[3, 3, 0]]
    assert part.total_length == 6
    # A chunk inside a later document is not "single document" (its doc does not start at 0).
    assert not part.index_select(torch.tensor([0, 1])).single_document


def test_bad_input_errors():
    with pytest.raises(ValueError, match="doc_starts"):
        SequenceLayout(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="positions"):
        SequenceLayout(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="total_length"):
        SequenceLayout.contiguous(1, 3).__class__(torch.zeros(1, 3, dtype=torch.int64),
                                                  torch.zeros(1, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="tokens"):
        SequenceLayout.from_tokens(torch.zeros(3, dtype=torch.int64), EOD)


@pytest.mark.parametrize("eod_prob", [0.0, 0.2])
def test_facts_are_cached_python_values_matching_the_data(eod_prob):
    gen = torch.Generator().manual_seed(7)
    layout = SequenceLayout.from_tokens(random_tokens(2, 24, eod_prob, gen), EOD)
    assert layout.known_consecutive is True  # known without looking at the data
    assert layout.known_single_document is None  # data: computed on first use ...
    single = layout.single_document
    assert layout.known_single_document is single  # ... then cached for every later layer
    assert single == bool((layout.doc_starts == 0).all())
    assert layout.uniform_documents == bool((layout.doc_starts == layout.doc_starts[:, :1]).all())
    moved = layout.to("meta")  # facts travel with the layout, so no sync is needed there
    assert moved.positions.is_meta and moved.single_document is single and moved.consecutive


def test_index_select_facts():
    contiguous = SequenceLayout.contiguous(1, 6)
    assert contiguous.index_select(torch.tensor([0, 1, 4, 5])).known_single_document is True
    shuffled = contiguous.index_select(torch.tensor([0, 1, 4, 5]))
    assert not shuffled.consecutive
    later = SequenceLayout.from_tokens(torch.tensor([[1, EOD, 3, 4]]), EOD).index_select(torch.tensor([2, 3]))
    assert later.consecutive and later.uniform_documents and not later.single_document


def test_derived_is_built_once_per_layout_and_usable_by_autograd(monkeypatch):
    builds = []
    with torch.inference_mode():  # e.g. an evaluation's layout
        layout = SequenceLayout.from_tokens(torch.tensor([[5, EOD, 6, 7]]), EOD)
        first = layout.derived(("twice",), lambda: builds.append(1) or layout.positions * 2)
    assert layout.derived(("twice",), lambda: builds.append(1)) is first and len(builds) == 1
    assert not first.is_inference()  # autograd may save it for a later backward
    x = torch.ones(1, 4, requires_grad=True)
    (x * first).sum().backward()
    assert x.grad.tolist() == [[0.0, 2.0, 4.0, 6.0]]
    assert layout.resets is layout.resets and layout.resets.tolist() == [[True, False, True, False]]
    # While torch.compile traces, built inline: the graph holds its own values, no dict guards.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layout.derived(("twice",), lambda: builds.append(1))
    assert len(builds) == 2
