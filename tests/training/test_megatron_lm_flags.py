"""Megatron-LM's example launch scripts against pretrain_mosaic.py's parser: every flag is known,
and each script either validates or is refused one flag at a time, by name, in one line."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shlex

import pytest

from megatron_mosaic.training.arguments import ArgumentError, build_parser, validate_args

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "training" / "megatron_lm_scripts"
# Flags another issue is still adding (docs/megatron_lm_flags.md); until they land they are left
# out here. Every flag of the scripts has landed.
PENDING: dict[str, str] = {}
# The data and tokenizer lines are replaced by mock data (the scripts' files do not exist here).
DATA_FLAGS = {"--data-path", "--vocab-file", "--merge-file", "--tokenizer-type", "--tokenizer-model",
              "--vocab-size", "--mock-data"}
NO_WANDB = importlib.util.find_spec("wandb") is None
# Not for these scripts: sequence parallelism at their TP=1 (Megatron-LM only warns).
SCALE_REFUSED = {"--sequence-parallel"}
LLAMA_REFUSED = SCALE_REFUSED | {"--group-query-attention", "--rotary-base", "--attention-backend",
                 "--apply-layernorm-1p", "--decoupled-lr", "--decoupled-min-lr",
                 "--grad-reduce-in-bf16", "--fp8-format", "--fp8-amax-history-len",
                 "--fp8-amax-compute-algo", "--fp8-param-gather"}
NO_ROPE = {"--position-embedding-type", "--rotary-percent"}  # Mosaic: no positional encoding
MIXTRAL_REFUSED = (SCALE_REFUSED | {"--group-query-attention", "--rotary-base", "--num-experts", "--moe-router-topk",
                    "--moe-router-load-balancing-type", "--moe-aux-loss-coeff", "--moe-grouped-gemm",
                    "--moe-token-dispatcher-type", "--expert-model-parallel-size"}
                   | ({"--wandb-project"} if NO_WANDB else set()))
# script -> (world size, refused flags for --model gpt, extra refused for --model mosaic-v2)
EXPECTED = {
    "gpt3_175b": (128, {"--rampup-batch-size", "--fp16"}, set()),
    "llama3_8b_fp8_mock": (8, LLAMA_REFUSED | {"--tiktoken-pattern"}, NO_ROPE),
    "llama3_8b_fp8_data": (8, LLAMA_REFUSED, NO_ROPE),
    "mixtral_8x7b": (2, MIXTRAL_REFUSED, {"--position-embedding-type"}),
}


def script_lines(name: str) -> list[list[str]]:
    """One token list per flag line; the script's commented-out options (#--) included."""
    lines = (SCRIPTS / f"{name}.txt").read_text().splitlines()
    return [shlex.split(line.lstrip("#")) for line in lines if line.lstrip("#").startswith("--")]


def union_of_flags() -> set[str]:
    return {line[0] for name in EXPECTED for line in script_lines(name)}


def test_the_copied_flag_lists_are_the_99_flags():
    listed = (ROOT.parent / "shared" / "design" / "megatron_lm_example_flags.txt")
    union = union_of_flags()
    assert len(union) == 99
    if listed.exists():  # the lead's list, outside the repository
        assert union == set(listed.read_text().split())


def test_every_flag_is_known_to_the_parser():
    known = build_parser()._option_string_actions
    unknown = sorted(f for f in union_of_flags() if f not in known and f not in PENDING)
    assert not unknown, f"unrecognized by pretrain_mosaic.py: {unknown}"


def _validation_argv(name: str, tmp_path: pathlib.Path) -> list[list[str]]:
    known = build_parser()._option_string_actions
    paths = {"CHECKPOINT_PATH": tmp_path / "ckpt", "TENSORBOARD_LOGS_PATH": tmp_path / "tb",
             "DATA_CACHE_PATH": tmp_path / "cache"}
    out = [["--mock-data"], ["--tokenizer-type", "NullTokenizer"], ["--vocab-size", "1000"]]
    for line in script_lines(name):
        if line[0] in DATA_FLAGS or (line[0] in PENDING and line[0] not in known):
            continue
        out.append([str(paths.get(tok, tok)) for tok in line])
    return out


@pytest.mark.parametrize("model", ["gpt", "mosaic-v2"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scripts_validate_or_are_refused_flag_by_flag(name, model, tmp_path):
    """Drop the flag each refusal names until the rest validates: the dropped set is exactly the
    one docs/megatron_lm_flags.md marks refused for that script and model."""
    world_size, refused, no_rope = EXPECTED[name]
    lines = _validation_argv(name, tmp_path) + [["--model", model]]
    dropped = set()
    for _ in range(len(lines)):
        argv = [tok for line in lines for tok in line]
        try:
            validate_args(build_parser().parse_args(argv), world_size)
            break
        except ArgumentError as err:
            message = str(err)
            assert "\n" not in message
            flag = re.match(r"(--[a-z0-9-]+)", message)
            assert flag and any(line[0] == flag.group(1) for line in lines), message
            dropped.add(flag.group(1))
            lines = [line for line in lines if line[0] != flag.group(1)]
    else:
        pytest.fail("validation never succeeded")
    expected = refused | (no_rope if model != "gpt" else set())
    assert dropped - set(PENDING) == expected


def test_docs_table_lists_every_flag():
    table = (ROOT / "docs" / "megatron_lm_flags.md").read_text()
    rows = set(re.findall(r"^\| `(--[a-z0-9-]+)`", table, flags=re.M))
    missing = sorted(union_of_flags() - rows)
    assert not missing, f"docs/megatron_lm_flags.md has no row for {missing}"


def test_refusals_and_no_ops(capsys):
    from megatron_mosaic.training.arguments import parse_args

    base = ["--mock-data", "--vocab-size", "64", "--model", "mosaic-v1"]
    for argv, fragment in ((["--swiglu"], "--swiglu: mosaic-v1 has no MLP"),
                           (["--untie-embeddings-and-output-weights"], "mosaic-v1 ties"),
                           (["--normalization", "RMSNorm"], "--model mosaic-v1 uses LayerNorm"),
                           (["--kv-channels", "7"], "--kv-channels 7"),
                           (["--max-position-embeddings", "8"], "--max-position-embeddings (8)"),
                           (["--attention-dropout", "0.1"], "no attention probabilities"),
                           (["--expert-model-parallel-size", "2"], "no model here has experts")):
        with pytest.raises(SystemExit) as info:
            parse_args(base + argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
    args = parse_args(base + ["--calculate-per-token-loss", "--use-mcore-models", "--no-position-embedding",
                              "--expert-model-parallel-size", "1", "--normalization", "LayerNorm",
                              "--max-position-embeddings", "4096", "--num-query-groups", "2"])
    assert args.calculate_per_token_loss and args.attention_dropout == 0.0
