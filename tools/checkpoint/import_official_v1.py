"""Import a checkpoint of the official nanoMosaics ``MemoryMosaic`` (Memory Mosaics v1).

    python tools/checkpoint/import_official_v1.py --input ckpt.pt --output DIR [--num-attention-heads H]

``--input`` is either a bare ``model.state_dict()`` or the dict nanoGPT's ``train.py`` saves
(``{'model': ..., 'model_args': ..., ...}``); ``_orig_mod.`` (torch.compile) and ``module.``
(DDP) key prefixes are removed. The architecture (layers, heads, width, vocabulary, persistent
memory size, bias) is read off the tensors and cross-checked against ``model_args`` and
``--num-attention-heads`` when given. The output is a checkpoint of this project at iteration 0
(``DIR/latest_checkpointed_iteration.txt`` + ``DIR/iter_0000000/``) holding a ``--model
mosaic-v1`` MosaicModel whose logits equal the official model's (fp32, dropout 0), loadable by
``pretrain_mosaic.py --load DIR`` and ``training.checkpointing.load_checkpoint``.

The conversion is all-or-nothing: any missing, unknown or misshapen tensor is an error naming
the key, every model parameter must receive a value, and the checkpoint is written to a
temporary sibling directory that is renamed to ``--output`` only once complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_mosaic.model.official_v1 import (  # noqa: E402
    OFFICIAL_KEY_SCALE_MAX,
    OfficialCheckpointError,
    OfficialV1Shape,
    infer_official_shape,
    load_mapped_state_dict,
    map_official_state_dict,
    read_official_checkpoint,
)
from tools._cli import cli_error  # noqa: E402

IMPORT_ITERATION = 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--input", required=True, help="official state dict or train.py checkpoint (.pt)")
    p.add_argument("--output", required=True, help="new checkpoint directory (must not exist)")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="expected head count; an error if the checkpoint disagrees")
    p.add_argument("--v1-key-scale-max", type=float, default=OFFICIAL_KEY_SCALE_MAX,
                   help="key-scale clamp of the official code that trained the checkpoint: 5 in the "
                        "current mosaic_model.py, log(2**16 - 1) = 11.09 in an earlier revision")
    p.add_argument("--seq-length", type=int, default=None,
                   help="context length to record; default the official block size")
    p.add_argument("--document-masking", action="store_true",
                   help="turn on document masking for further training (the official model has none, "
                        "so logits then differ from the official ones on packed documents)")
    p.add_argument("--tokenizer-type", default=None, help="recorded in the checkpoint arguments")
    p.add_argument("--tokenizer-model", default=None, help="recorded in the checkpoint arguments")
    return p


def checkpoint_args(shape: OfficialV1Shape, cli: argparse.Namespace) -> dict[str, Any]:
    """The run arguments stored with the checkpoint, from which ``build_model`` rebuilds the model."""
    from megatron_mosaic.training.arguments import ArgumentError, args_from_dict, args_to_dict, validate_args

    seq_length = cli.seq_length or shape.block_size
    if seq_length is None:
        raise OfficialCheckpointError(
            f"{cli.input}: holds no block size (no mask buffers, no model_args); pass --seq-length"
        )
    args = args_from_dict(
        {},
        model="mosaic-v1",
        num_layers=shape.n_layer,
        hidden_size=shape.n_embd,
        num_attention_heads=shape.n_head,
        seq_length=seq_length,
        persistent_memory_size=shape.pmem_size,
        disable_bias_linear=not shape.bias,
        v1_key_scale_max=cli.v1_key_scale_max,
        document_masking=cli.document_masking,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        vocab_size=shape.vocab_size,
        # The official embedding is already padded (50304 for GPT-2): keep it, as padding it
        # further would add logits and change the softmax.
        padded_vocab_size=shape.vocab_size,
        eod_token_id=None,
        tokenizer_type=cli.tokenizer_type,
        tokenizer_model=cli.tokenizer_model,
    )
    # Validate and derive (world size 1, TP=PP=CP=1) as a mock-data run would; the data
    # arguments are the user's to give when training from this checkpoint.
    args.mock_data = True
    try:
        validate_args(args, world_size=1)
    except ArgumentError as err:
        raise OfficialCheckpointError(f"{cli.input}: the imported model's arguments are invalid: {err}") from err
    args.mock_data = False
    saved = args_to_dict(args)
    saved["imported_from_official_v1"] = os.path.abspath(cli.input)
    return saved


def _staging_dir(output: str) -> str:
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.importing-{os.getpid()}")


def training_flags(saved: dict[str, Any], load_dir: str) -> str:
    """The pretrain_mosaic.py model flags that rebuild exactly this model, plus --load."""
    flags = [
        "--model mosaic-v1", f"--num-layers {saved['num_layers']}", f"--hidden-size {saved['hidden_size']}",
        f"--num-attention-heads {saved['num_attention_heads']}", f"--seq-length {saved['seq_length']}",
        f"--persistent-memory-size {saved['persistent_memory_size']}",
        f"--v1-key-scale-max {saved['v1_key_scale_max']}",
    ]
    if saved["disable_bias_linear"]:
        flags.append("--disable-bias-linear")
    if not saved["document_masking"]:
        flags.append("--no-document-masking")
    return " ".join(flags + [f"--load {load_dir}"])


def import_official_v1(argv: Optional[Sequence[str]] = None) -> tuple[str, dict[str, Any]]:
    """Run the import; returns (output directory, stored run arguments).

    Raises OfficialCheckpointError on any input that cannot be imported exactly.
    """
    cli = build_parser().parse_args(argv)
    output = os.path.abspath(cli.output)
    if os.path.exists(output):
        raise OfficialCheckpointError(f"--output {cli.output!r} already exists; give a new directory")

    # Everything about the input is checked before any process group or model exists.
    state_dict, model_args = read_official_checkpoint(cli.input)
    shape = infer_official_shape(state_dict, model_args, cli.num_attention_heads, source=cli.input)
    mapped = map_official_state_dict(state_dict, shape, source=cli.input)
    args_dict = checkpoint_args(shape, cli)

    import torch.distributed as dist

    from megatron_mosaic.training.arguments import args_from_dict
    from megatron_mosaic.training.checkpointing import save_checkpoint
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.model_builder import build_model

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise OfficialCheckpointError(f"run the importer as a single process, not {world} ranks")
    args = args_from_dict(args_dict)
    started_here = not dist.is_initialized()
    staging = _staging_dir(output)
    try:
        initialize_distributed(args)  # a one-rank gloo group (TP=PP=1) when run as a script
        chunks = build_model(args)
        if len(chunks) != 1:
            raise OfficialCheckpointError(f"expected one model chunk at TP=PP=1, build_model gave {len(chunks)}")
        load_mapped_state_dict(chunks[0], mapped, source=cli.input)
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(staging, IMPORT_ITERATION, chunks, args=args_dict, consumed_samples=0)
        os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if started_here:
            from megatron_mosaic.training.initialize import destroy_distributed

            destroy_distributed()
    return output, args_dict


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        output, saved = import_official_v1(argv)
    except OfficialCheckpointError as err:
        return cli_error("import_official_v1", err, status=2)
    print(f"import_official_v1: wrote {output} (iteration {IMPORT_ITERATION}, vocabulary "
          f"{saved['padded_vocab_size']}); train from it with the same model flags:\n"
          f"  pretrain_mosaic.py {training_flags(saved, output)} ...")
    return 0


if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "import_official_v1"))
