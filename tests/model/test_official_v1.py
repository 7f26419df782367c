"""The official-v1 importer: names/shapes of the published model, strict mapping, and the
end-to-end check that an imported checkpoint reproduces the official logits.

"Official model" here is tests/model/official_v1_reference.py, written from the published
nanoMosaics parameter names and formulas; the first test pins its state-dict layout to the
published one so the importer is tested against the real format.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from megatron_mosaic.model.official_v1 import (
    OfficialCheckpointError,
    OfficialV1Shape,
    infer_official_shape,
    load_mapped_state_dict,
    map_official_state_dict,
    read_official_checkpoint,
)
from tests.distributed import run_distributed
from tests.model.official_v1_reference import OfficialV1Config, RefMemoryMosaic, randomize_

TINY = dict(block_size=32, vocab_size=67, n_layer=2, n_head=3, n_embd=24, pmem_size=10)


def importer():
    return importlib.import_module("tools.checkpoint.import_official_v1")


def official_state_dict(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    cfg = OfficialV1Config(**{**TINY, **overrides})
    model = randomize_(RefMemoryMosaic(cfg), torch.Generator().manual_seed(seed))
    return model.state_dict()


def published_layer_shapes(h: int, d: int, p: int, n: int, bias: bool) -> dict[str, tuple]:
    """Per-block entries of the official state dict (nanoMosaics/mosaic_model.py), written out."""
    hs = d // h
    scalar = (1, h, 1, 1)
    shapes = {
        "ln_1.weight": (d,), "ln_2.weight": (d,),
        "attn.bias": (1, 1, n, n),  # registered causal-mask buffer
        "attn.k_featurizer.W_k.weight": (d, d),
        "attn.k_featurizer.leaky_avg.coef": (n, n),  # registered lag-table buffer
        "attn.k_featurizer.leaky_avg.leaky_key_beta": scalar,
        "attn.k_featurizer.key_scale": scalar,
        "attn.v_featurizer.W_v.weight": (d, d),
        "attn.v_featurizer.coef": scalar,
        "attn.v_featurizer.val_scale": scalar,
        "attn.c_proj.weight": (d, d),
        "mlp.k_featurizer.W_k.weight": (d, d),
        "mlp.k_featurizer.leaky_avg.coef": (n, n),
        "mlp.k_featurizer.leaky_avg.leaky_key_beta": scalar,
        "mlp.k_featurizer.key_scale": scalar,
        "mlp.P_k": (1, 1, h, p, hs),
        "mlp.P_v": (1, 1, h, p, hs),
        "mlp.out_scale": scalar,
        "mlp.c_proj.weight": (d, d),
    }
    if bias:
        for name in ("ln_1", "ln_2", "attn.k_featurizer.W_k", "attn.v_featurizer.W_v", "attn.c_proj",
                     "mlp.k_featurizer.W_k", "mlp.c_proj"):
            shapes[f"{name}.bias"] = (d,)
    return shapes


@pytest.mark.parametrize("bias", [True, False])
def test_reference_has_the_published_state_dict_layout(bias):
    sd = official_state_dict(bias=bias)
    c = TINY
    want = {"mosaic.wte.weight": (c["vocab_size"], c["n_embd"]), "lm_head.weight": (c["vocab_size"], c["n_embd"]),
            "mosaic.ln_f.weight": (c["n_embd"],)}
    if bias:
        want["mosaic.ln_f.bias"] = (c["n_embd"],)
    for i in range(c["n_layer"]):
        layer = published_layer_shapes(c["n_head"], c["n_embd"], c["pmem_size"], c["block_size"], bias)
        want.update({f"mosaic.h.{i}.{k}": v for k, v in layer.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert sd["mosaic.h.0.attn.bias"].dtype == torch.bool


def test_infer_shape_bare_and_train_checkpoint(tmp_path):
    sd = official_state_dict(bias=False)
    want = OfficialV1Shape(n_layer=2, n_head=3, n_embd=24, vocab_size=67, pmem_size=10, pmem_count=1,
                           bias=False, block_size=32)
    assert infer_official_shape(sd) == want
    assert infer_official_shape(sd, num_heads=3) == want

    # nanoGPT train.py format, saved from a torch.compile'd model.
    model_args = dict(n_layer=2, n_head=3, n_embd=24, block_size=32, bias=False, vocab_size=67,
                      dropout=0.0, pmem_count=1, pmem_size=10)
    ckpt = {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "model_args": model_args,
            "optimizer": {"state": {}, "param_groups": []}, "iter_num": 5,
            "best_val_loss": torch.tensor(3.2), "config": {"dataset": "x", "compile": True}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    read_sd, read_args = read_official_checkpoint(tmp_path / "ckpt.pt")
    assert read_args == model_args
    assert set(read_sd) == set(sd)
    assert infer_official_shape(read_sd, read_args) == want

    with pytest.raises(OfficialCheckpointError, match=r"model_args\['n_head'\] = 4"):
        infer_official_shape(sd, {**model_args, "n_head": 4})


def test_mapping_renames_and_reshapes_every_tensor():
    sd = official_state_dict(bias=True)
    shape = infer_official_shape(sd)
    mapped = map_official_state_dict(sd, shape)
    h, d, p, hs = 3, 24, 10, 8
    # Every learned official tensor lands in exactly one of ours (lm_head is the tied embedding).
    n_params = len([k for k in sd if not k.endswith(("attn.bias", "leaky_avg.coef"))]) - 1
    assert len(mapped) == n_params
    for i in range(2):
        off, ours = f"mosaic.h.{i}", f"decoder.layers.{i}"
        for o, m in (("attn", "contextual_memory"), ("mlp", "persistent_memory")):
            ke = f"{ours}.{m}.key_extractor"
            assert torch.equal(mapped[f"{ke}.leak"], sd[f"{off}.{o}.k_featurizer.leaky_avg.leaky_key_beta"].view(h))
            assert torch.equal(mapped[f"{ke}.key_scale"], sd[f"{off}.{o}.k_featurizer.key_scale"].view(h))
            assert torch.equal(mapped[f"{ke}.linear_key.weight"], sd[f"{off}.{o}.k_featurizer.W_k.weight"])
            assert torch.equal(mapped[f"{ke}.linear_key.bias"], sd[f"{off}.{o}.k_featurizer.W_k.bias"])
            assert torch.equal(mapped[f"{ours}.{m}.linear_proj.weight"], sd[f"{off}.{o}.c_proj.weight"])
        ve = f"{ours}.contextual_memory.value_extractor"
        assert torch.equal(mapped[f"{ve}.mix"], sd[f"{off}.attn.v_featurizer.coef"].view(h))
        assert torch.equal(mapped[f"{ve}.value_scale"], sd[f"{off}.attn.v_featurizer.val_scale"].view(h))
        assert torch.equal(mapped[f"{ve}.linear_value.bias"], sd[f"{off}.attn.v_featurizer.W_v.bias"])
        pm = f"{ours}.persistent_memory"
        assert mapped[f"{pm}.memory_keys"].shape == (h, p, hs)
        assert torch.equal(mapped[f"{pm}.memory_keys"], sd[f"{off}.mlp.P_k"][0, 0])
        assert torch.equal(mapped[f"{pm}.memory_values"], sd[f"{off}.mlp.P_v"][0, 0])
        assert torch.equal(mapped[f"{pm}.output_scale"], sd[f"{off}.mlp.out_scale"].view(h))
        assert torch.equal(mapped[f"{ours}.pre_persistent_layernorm.bias"], sd[f"{off}.ln_2.bias"])
    assert torch.equal(mapped["embedding.word_embeddings.weight"], sd["mosaic.wte.weight"])
    assert torch.equal(mapped["decoder.final_layernorm.weight"], sd["mosaic.ln_f.weight"])
    assert mapped["decoder.layers.1.input_layernorm.weight"].shape == (d,)


def test_cropped_block_size_and_dropped_buffers():
    sd = official_state_dict()
    # The official crop_block_size() shrinks the mask buffer but not the lag tables.
    cropped = dict(sd)
    for i in range(2):
        cropped[f"mosaic.h.{i}.attn.bias"] = sd[f"mosaic.h.{i}.attn.bias"][:, :, :20, :20]
    shape = infer_official_shape(cropped)
    assert shape.block_size == 20
    map_official_state_dict(cropped, shape)
    bare = {k: v for k, v in sd.items() if not k.endswith(("attn.bias", "leaky_avg.coef"))}
    assert infer_official_shape(bare).block_size is None
    assert infer_official_shape(bare, {"block_size": 16}).block_size == 16
    map_official_state_dict(bare, infer_official_shape(bare))


def _run_cli_expecting_error(tmp_path, capsys, sd, match: str, *extra: str) -> None:
    src, out = tmp_path / "official.pt", tmp_path / "imported"
    torch.save(sd, src)
    code = importer().main(["--input", str(src), "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(src) in err or "--num-attention-heads" in err, err
    assert match in err, err
    assert not out.exists() and not any(p.name.startswith(".imported") for p in tmp_path.iterdir())


def test_cli_rejects_wrong_head_count(tmp_path, capsys):
    _run_cli_expecting_error(tmp_path, capsys, official_state_dict(), "3 heads", "--num-attention-heads", "4")


def test_cli_rejects_missing_key(tmp_path, capsys):
    sd = official_state_dict()
    del sd["mosaic.h.1.attn.v_featurizer.val_scale"]
    _run_cli_expecting_error(tmp_path, capsys, sd, "missing keys: ['mosaic.h.1.attn.v_featurizer.val_scale']")


def test_cli_rejects_unknown_key(tmp_path, capsys):
    sd = official_state_dict()
    sd["mosaic.h.0.attn.q_featurizer.W_q.weight"] = torch.zeros(24, 24)
    _run_cli_expecting_error(tmp_path, capsys, sd, "unexpected keys: ['mosaic.h.0.attn.q_featurizer.W_q.weight']")
    sd = official_state_dict()
    sd["mosaic.h.2.ln_1.weight"] = torch.ones(24)  # a third layer with only one tensor
    _run_cli_expecting_error(tmp_path, capsys, sd, "missing keys: ['mosaic.h.2.ln_1.bias'")


def test_cli_rejects_shape_mismatch(tmp_path, capsys):
    sd = official_state_dict()
    sd["mosaic.h.1.mlp.c_proj.weight"] = torch.zeros(24, 12)
    _run_cli_expecting_error(tmp_path, capsys, sd, "mosaic.h.1.mlp.c_proj.weight: (24, 12) (expected (24, 24))")
    sd = official_state_dict()
    sd["mosaic.h.0.mlp.k_featurizer.key_scale"] = torch.zeros(1, 4, 1, 1)  # head count differs by layer
    _run_cli_expecting_error(tmp_path, capsys, sd, "mosaic.h.0.mlp.k_featurizer.key_scale: (1, 4, 1, 1)")


def test_cli_rejects_other_unsupported_inputs(tmp_path, capsys):
    _run_cli_expecting_error(tmp_path, capsys, official_state_dict(pmem_count=2), "pmem_count = 2")
    sd = official_state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    _run_cli_expecting_error(tmp_path, capsys, sd, "lm_head.weight differs from mosaic.wte.weight")
    sd = official_state_dict()
    sd["mosaic.h.1.attn.bias"] = torch.ones_like(sd["mosaic.h.1.attn.bias"])
    _run_cli_expecting_error(tmp_path, capsys, sd, "buffer 'mosaic.h.1.attn.bias'")
    sd = official_state_dict()
    sd["mosaic.h.0.attn.k_featurizer.W_k.weight"] = "not a tensor"
    _run_cli_expecting_error(tmp_path, capsys, sd, "expected a tensor")
    _run_cli_expecting_error(tmp_path, capsys, {"model": {}, "model_args": {}}, "missing key 'mosaic.wte.weight'")


def test_cli_refuses_existing_output(tmp_path, capsys):
    src = tmp_path / "official.pt"
    torch.save(official_state_dict(), src)
    (tmp_path / "imported").mkdir()
    assert importer().main(["--input", str(src), "--output", str(tmp_path / "imported")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_load_mapped_refuses_partial_load():
    model = RefMemoryMosaic(OfficialV1Config(**TINY))  # any module: the check is generic
    sd = model.state_dict()
    load_mapped_state_dict(model, {k: torch.zeros_like(v) for k, v in sd.items()})
    assert model.mosaic.h[0].mlp.P_k.abs().sum() == 0
    partial = {k: v for k, v in sd.items() if k != "mosaic.h.1.mlp.out_scale"}
    with pytest.raises(OfficialCheckpointError, match="no official source: \\['mosaic.h.1.mlp.out_scale'\\]"):
        load_mapped_state_dict(model, partial)
    with pytest.raises(OfficialCheckpointError, match="does not have: \\['extra'\\]"):
        load_mapped_state_dict(model, {**sd, "extra": torch.zeros(1)})
    with pytest.raises(OfficialCheckpointError, match="shape mismatches"):
        load_mapped_state_dict(model, {**sd, "mosaic.ln_f.weight": torch.zeros(5)})
    # The HF importer shares this loader and passes its own error class.
    with pytest.raises(RuntimeError, match="no official source"):
        load_mapped_state_dict(model, partial, error=RuntimeError)


# ---------------------------------------------------------------------------------------------
# End to end: official state dict -> importer CLI -> project checkpoint -> build_model +
# load_checkpoint (the project's load path) -> logits equal to the official model's.

OLD_KEY_SCALE_MAX = 11.090339630053647  # log(2**16 - 1), the earlier official revision

E2E_CASES = [
    # (name, official config overrides, saved as train.py checkpoint from torch.compile, extra CLI args)
    ("bias_bare", dict(bias=True), False, ["--num-attention-heads", "3"]),
    ("nobias_trainpy_compiled", dict(bias=False), True, []),
    ("old_key_scale_clamp", dict(bias=False, key_scale_max=OLD_KEY_SCALE_MAX), False,
     ["--v1-key-scale-max", str(OLD_KEY_SCALE_MAX)]),
]


def _import_and_compare(rank: int, world_size: int, tmp: str) -> dict:
    from megatron_mosaic.training.checkpointing import load_checkpoint, read_checkpoint_args
    from megatron_mosaic.training.model_builder import build_model

    results = {}
    for i, (name, overrides, trainpy, extra) in enumerate(E2E_CASES):
        cfg = OfficialV1Config(**{**TINY, **overrides})
        official = randomize_(RefMemoryMosaic(cfg), torch.Generator().manual_seed(10 + i)).eval()
        sd = official.state_dict()
        if trainpy:
            model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                              bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.0, pmem_count=1,
                              pmem_size=cfg.pmem_size)
            sd = {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "model_args": model_args,
                  "optimizer": {"state": {}, "param_groups": []}, "iter_num": 100}
        src, out = os.path.join(tmp, f"{name}.pt"), os.path.join(tmp, name)
        torch.save(sd, src)
        assert importer().main(["--input", src, "--output", out, *extra]) == 0
        assert sorted(os.listdir(out)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]

        args = read_checkpoint_args(out)
        chunks = build_model(args)
        # Scramble first, so equal logits prove the checkpoint (not a lucky init) set every weight.
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.normal_()
        load_checkpoint(out, chunks, load_rng=False)
        model = chunks[0].eval()
        gen = torch.Generator().manual_seed(i)
        diffs = []
        for t in (cfg.block_size, 7):
            tokens = torch.randint(0, cfg.vocab_size, (2, t), generator=gen)
            with torch.no_grad():
                want, got = official(tokens), model(tokens)
            assert got.shape == want.shape, (got.shape, want.shape)
            diffs.append((want - got).abs().max().item())
        results[name] = dict(diffs=diffs, scale=want.abs().max().item(), args=args,
                             key_scale_max=model.config.v1_key_scale_max, bias=model.config.add_bias_linear,
                             document_masking=model.config.document_masking)
    return results


def test_imported_checkpoint_reproduces_official_logits(tmp_path):
    results = run_distributed(_import_and_compare, 1, str(tmp_path))[0]
    for name, overrides, _, _ in E2E_CASES:
        r = results[name]
        assert max(r["diffs"]) < 1e-4, (name, r["diffs"])
        assert r["scale"] > 1.0  # logits are not trivially small
        assert r["bias"] == overrides["bias"] and r["document_masking"] is False
        assert r["args"]["model"] == "mosaic-v1" and r["args"]["padded_vocab_size"] == TINY["vocab_size"]
        assert r["args"]["num_attention_heads"] == 3 and r["args"]["seq_length"] == TINY["block_size"]
    assert results["old_key_scale_clamp"]["key_scale_max"] == OLD_KEY_SCALE_MAX
    assert results["bias_bare"]["key_scale_max"] == 5.0
    # The printed pretrain_mosaic.py flags rebuild the same model arguments.
    from megatron_mosaic.training.arguments import parse_args

    for name, _, _, _ in E2E_CASES:
        saved = results[name]["args"]
        flags = importer().training_flags(saved, "/some/dir").split()
        parsed = vars(parse_args(flags + ["--mock-data", "--vocab-size", str(TINY["vocab_size"])]))
        for key in ("model", "num_layers", "hidden_size", "num_attention_heads", "seq_length",
                    "persistent_memory_size", "v1_key_scale_max", "disable_bias_linear", "document_masking",
                    "load"):
            assert parsed[key] == (saved[key] if key != "load" else "/some/dir"), key
