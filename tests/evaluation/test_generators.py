"""The task generators: exact lengths, answers that follow from the context, seeded output."""

from __future__ import annotations

import pytest

from megatron_mosaic.evaluation import SymbolVocab, TextSource, VocabError, generate_documents
from megatron_mosaic.evaluation.vocab import NUM_RESERVED

VOCAB = SymbolVocab("ids", 100)  # 23 symbols per set: keys 8..30, values 31..53, words 54..99


def ids(units) -> list[int]:
    return [int(u) for u in units]


def answers_with_context(doc):
    """(context ids before the answer, answer ids, answer fields) for every answer segment."""
    seen, out = [], []
    for seg in doc.segments:
        if seg.answer is not None:
            out.append((list(seen), ids(seg.units), seg.answer))
        seen += ids(seg.units)
    return out


def test_symbol_layout_is_disjoint():
    keys = {int(VOCAB.key(i)) for i in range(VOCAB.num_symbols)}
    values = {int(VOCAB.value(i)) for i in range(VOCAB.num_symbols)}
    words = {int(w) for w in VOCAB.words("To be, or not to be: that is the question " * 20)}
    assert VOCAB.num_symbols == 23 and min(keys) == NUM_RESERVED
    assert not keys & values and not (keys | values) & words
    assert max(words) < 100 and min(words) >= VOCAB.word_base
    assert VOCAB.words("Be be BE") == [VOCAB.words("be")[0]] * 3  # lower-cased before hashing


def test_recall_answers_are_the_paired_values_and_distances_count_units():
    for doc in generate_documents("recall", VOCAB, 64, 5, seed=3):
        flat = ids(doc.text.split())
        assert len(flat) == 64
        pairs = doc.meta["pairs"]
        table = dict(zip(flat[0:2 * pairs:2], flat[1:2 * pairs:2]))
        assert len(table) == pairs  # distinct keys
        for context, answer, fields in answers_with_context(doc):
            key = context[-1]
            assert answer == [table[key]]
            earlier = [i for i, t in enumerate(context[:-1]) if t == key]
            assert fields["distance"] == len(context) - 1 - earlier[-1]


def test_recall_pairing_differs_between_documents_and_is_seeded():
    first = [d.text for d in generate_documents("recall", VOCAB, 40, 4, seed=1)]
    again = [d.text for d in generate_documents("recall", VOCAB, 40, 4, seed=1)]
    other = [d.text for d in generate_documents("recall", VOCAB, 40, 4, seed=2)]
    assert first == again and first != other and len(set(first)) == 4
    # Document i does not depend on how many are generated.
    assert [d.text for d in generate_documents("recall", VOCAB, 40, 2, seed=1)] == first[:2]


def test_fewshot_shots_count_earlier_examples_of_the_class():
    doc = next(generate_documents("fewshot", VOCAB, 200, 1, seed=5))
    assert doc.num_units == 200
    label_of_feature, shots = {}, {}
    for context, answer, fields in answers_with_context(doc):
        features = context[-4:-1]  # three features, then the answer marker
        assert context[-1] == int(VOCAB.marker("answer"))
        labels = {label_of_feature[f] for f in features if f in label_of_feature}
        assert labels <= {answer[0]}  # a class's features never carry another label
        label_of_feature.update({f: answer[0] for f in features})
        assert fields["shot"] == shots.get(answer[0], 0)
        shots[answer[0]] = shots.get(answer[0], 0) + 1
    assert len(shots) == doc.meta["classes"] and max(shots.values()) >= 3


def test_multidoc_facts_are_in_the_context_at_their_depth(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 40)
    source = TextSource([str(corpus)], VOCAB)
    for doc in generate_documents("multidoc", VOCAB, 160, 3, seed=9, source=source):
        assert doc.num_units == 160
        context = ids(doc.segments[0].units)
        for ctx, answer, fields in answers_with_context(doc):
            key = ctx[-1]
            assert ctx[-2] == int(VOCAB.marker("query"))
            at = [i for i in range(len(context) - 2) if context[i] == int(VOCAB.marker("fact"))
                  and context[i + 1] == key]
            assert len(at) == 1 and context[at[0] + 2] == answer[0]
            assert fields["depth"] == pytest.approx(at[0] / (160 - 12), abs=1e-4)


def test_lm_windows_are_real_text_and_too_long_windows_are_refused(tmp_path):
    corpus = tmp_path / "text.jsonl"
    corpus.write_text('{"text": "a b c d e f g h i j"}\n')
    source = TextSource([str(corpus)], SymbolVocab("text"))
    doc = next(generate_documents("lm", SymbolVocab("text"), 4, 1, seed=0, source=source))
    assert doc.text in "a b c d e f g h i j" and doc.num_units == 4 and not doc.answers()
    with pytest.raises(VocabError, match="no work holds 11 units"):
        next(generate_documents("lm", SymbolVocab("text"), 11, 1, seed=0, source=source))


def test_text_format_renders_words():
    doc = next(generate_documents("recall", SymbolVocab("text", num_symbols=8), 12, 1, seed=0))
    assert all(u[0] in "KV" for u in doc.text.split())


def test_fewer_symbols_shift_the_layout_and_too_many_are_refused():
    small = SymbolVocab("ids", 100, 10)
    assert (small.key(0), small.key(9), small.value(0), small.value(9), small.word_base) == ("8", "17", "18", "27", 28)
    doc = next(generate_documents("recall", small, 40, 1, seed=0))
    assert all(8 <= int(u) < 28 for u in doc.text.split())
    with pytest.raises(VocabError, match=r"--num-symbols must be in \[4, 23\] for --vocab-size 100, got 24"):
        SymbolVocab("ids", 100, 24)
