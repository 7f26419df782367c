"""Read a state dict of the official nanoMosaics ``MemoryMosaic`` and rename it to ours.

The official v1 model (facebookresearch/MemoryMosaics, ``nanoMosaics/mosaic_model.py``) stores
per-head scalars as (1, H, 1, 1) tensors and the persistent memory as
(pmem_count, 1, H, P, hs); ours stores (H,) scalars and (H, P, hs) memories under Megatron-style
names (see the parameter-name contract). Everything here is strict: every official tensor must be
consumed by exactly one rule, every name/shape must match what the inferred architecture
predicts, and the caller checks that every model parameter received a value. A checkpoint that
does not fit raises ``OfficialCheckpointError`` naming the file and the offending key.

Pure torch, no Megatron: the CLI ``tools/checkpoint/import_official_v1.py`` builds the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# Prefixes that wrappers add to every key: torch.compile (OptimizedModule) and DDP.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_LAYER_KEY = re.compile(r"^mosaic\.h\.(\d+)\.")
# Key scale clamp of the current official code (the older revision used log(2**16 - 1)).
OFFICIAL_KEY_SCALE_MAX = 5.0


class OfficialCheckpointError(ValueError):
    """The input is not a state dict of the official v1 model this importer can map exactly."""


@dataclass(frozen=True)
class OfficialV1Shape:
    """Architecture of an official v1 checkpoint, read off its tensors (names as the official config)."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    pmem_size: int
    pmem_count: int
    bias: bool
    block_size: int | None  # from the registered mask buffer; None if the buffers were dropped

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# ---------------------------------------------------------------------------------------------
# Reading


def read_official_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """Load ``path``: a bare state dict, or nanoGPT train.py's {'model': ..., 'model_args': ...}.

    Returns (state dict with wrapper prefixes removed, model_args or None).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OfficialCheckpointError(f"--input {path!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle of arbitrary objects, truncated file, not a torch file ...
        raise OfficialCheckpointError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    model_args = None
    if "model" in obj and isinstance(obj["model"], Mapping):
        model_args = obj.get("model_args")
        if model_args is not None and not isinstance(model_args, Mapping):
            raise OfficialCheckpointError(f"{path}: 'model_args' is a {type(model_args).__name__}, expected a dict")
        obj = obj["model"]
    return strip_wrapper_prefixes(obj, source=path), (dict(model_args) if model_args is not None else None)


def strip_wrapper_prefixes(state_dict: Mapping[str, object], source: str = "state dict") -> dict[str, Tensor]:
    """Drop '_orig_mod.' / 'module.' prefixes (any order, any depth); reject non-tensor values."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise OfficialCheckpointError(
                f"{source}: entry {key!r} is a {type(value).__name__}, expected a tensor in a state dict"
            )
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise OfficialCheckpointError(f"{source}: {key!r} and another key both map to {name!r}")
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Inferring and checking the architecture


def _require(sd: Mapping[str, Tensor], name: str, source: str) -> Tensor:
    if name not in sd:
        raise OfficialCheckpointError(f"{source}: missing key {name!r}; is this an official nanoMosaics MemoryMosaic?")
    return sd[name]


def infer_official_shape(
    sd: Mapping[str, Tensor],
    model_args: Mapping | None = None,
    num_heads: int | None = None,
    source: str = "state dict",
) -> OfficialV1Shape:
    """Read n_layer, n_head, n_embd, vocab, pmem size/count, bias and block size off the tensors.

    The head count comes from the (1, H, 1, 1) scalars and P_k; ``num_heads`` (the CLI's
    --num-attention-heads) and ``model_args`` (train.py checkpoints) are cross-checks only.
    """
    wte = _require(sd, "mosaic.wte.weight", source)
    if wte.dim() != 2:
        raise OfficialCheckpointError(f"{source}: mosaic.wte.weight has shape {tuple(wte.shape)}, expected (vocab, n_embd)")
    vocab_size, n_embd = wte.shape
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))})
    if not layers:
        raise OfficialCheckpointError(f"{source}: no 'mosaic.h.<i>.' keys, so no layers to import")
    if layers != list(range(len(layers))):
        raise OfficialCheckpointError(f"{source}: layer indices {layers} are not 0..{len(layers) - 1}")

    scale_key = "mosaic.h.0.attn.k_featurizer.key_scale"
    scale = _require(sd, scale_key, source)
    if scale.dim() != 4 or scale.shape[0] != 1 or scale.shape[2:] != (1, 1):
        raise OfficialCheckpointError(f"{source}: {scale_key} has shape {tuple(scale.shape)}, expected (1, n_head, 1, 1)")
    n_head = scale.shape[1]
    if n_embd % n_head:
        raise OfficialCheckpointError(f"{source}: n_embd {n_embd} is not divisible by the {n_head} heads of {scale_key}")
    pk_key = "mosaic.h.0.mlp.P_k"
    pk = _require(sd, pk_key, source)
    if pk.dim() != 5 or pk.shape[1] != 1 or pk.shape[2] != n_head or pk.shape[4] != n_embd // n_head:
        raise OfficialCheckpointError(
            f"{source}: {pk_key} has shape {tuple(pk.shape)}, expected (pmem_count, 1, {n_head}, pmem_size, "
            f"{n_embd // n_head}) for n_embd {n_embd} and {n_head} heads"
        )
    shape = OfficialV1Shape(
        n_layer=len(layers), n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, pmem_size=pk.shape[3],
        pmem_count=pk.shape[0], bias="mosaic.h.0.ln_1.bias" in sd,
        block_size=_block_size(sd, model_args, source),
    )
    if num_heads is not None and num_heads != n_head:
        raise OfficialCheckpointError(
            f"--num-attention-heads {num_heads} disagrees with {source}: {scale_key} has shape "
            f"{tuple(scale.shape)}, i.e. {n_head} heads"
        )
    for field, value in asdict(shape).items():
        given = (model_args or {}).get(field)
        if given is not None and given != value:
            raise OfficialCheckpointError(f"{source}: model_args[{field!r}] = {given!r} but the tensors say {value!r}")
    if shape.pmem_count != 1:
        raise OfficialCheckpointError(
            f"{source}: pmem_count = {shape.pmem_count} (from {pk_key}); only pmem_count 1 is supported: the "
            f"official model averages {shape.pmem_count} separately normalised memory banks, ours has one"
        )
    return shape


def _block_size(sd: Mapping[str, Tensor], model_args: Mapping | None, source: str) -> int | None:
    """The context length the checkpoint was trained/cropped to.

    The contextual-memory mask buffer is cropped by the official ``crop_block_size`` and so is
    authoritative; the leaky-average lag table is never cropped and only bounds it from above.
    """
    mask_key, coef_key = "mosaic.h.0.attn.bias", "mosaic.h.0.attn.k_featurizer.leaky_avg.coef"
    given = (model_args or {}).get("block_size")
    if mask_key in sd:
        return int(sd[mask_key].shape[-1])
    if coef_key in sd:
        bound = int(sd[coef_key].shape[-1])
        if given is not None and given > bound:
            raise OfficialCheckpointError(f"{source}: model_args['block_size'] = {given} exceeds {coef_key} size {bound}")
        return int(given) if given is not None else bound
    return int(given) if given is not None else None


def _scalar(t: Tensor) -> Tensor:
    """(1, H, 1, 1) -> (H,)."""
    return t.reshape(-1).clone()


def _bank(t: Tensor) -> Tensor:
    """(1, 1, H, P, hs) -> (H, P, hs)."""
    return t[0, 0].clone()


def _same(t: Tensor) -> Tensor:
    return t.clone()


def _key_extractor_rules(off: str, ours: str, bias: bool, h: int, d: int) -> list[tuple[str, tuple, str, Callable]]:
    rules = [
        (f"{off}.W_k.weight", (d, d), f"{ours}.linear_key.weight", _same),
        (f"{off}.leaky_avg.leaky_key_beta", (1, h, 1, 1), f"{ours}.leak", _scalar),
        (f"{off}.key_scale", (1, h, 1, 1), f"{ours}.key_scale", _scalar),
    ]
    if bias:
        rules.append((f"{off}.W_k.bias", (d,), f"{ours}.linear_key.bias", _same))
    return rules


def _linear_rules(off: str, ours: str, bias: bool, shape: tuple[int, ...]) -> list[tuple[str, tuple, str, Callable]]:
    rules = [(f"{off}.weight", shape, f"{ours}.weight", _same)]
    if bias:
        rules.append((f"{off}.bias", (shape[0],), f"{ours}.bias", _same))
    return rules


def official_rules(shape: OfficialV1Shape) -> list[tuple[str, tuple, str, Callable[[Tensor], Tensor]]]:
    """(official name, official shape, our name, transform) for every parameter of the model."""
    h, d, p, hs, b = shape.n_head, shape.n_embd, shape.pmem_size, shape.head_dim, shape.bias
    rules = [("mosaic.wte.weight", (shape.vocab_size, d), "embedding.word_embeddings.weight", _same)]
    for i in range(shape.n_layer):
        off, ours = f"mosaic.h.{i}", f"decoder.layers.{i}"
        cm, pm = f"{ours}.contextual_memory", f"{ours}.persistent_memory"
        rules += _linear_rules(f"{off}.ln_1", f"{ours}.input_layernorm", b, (d,))
        rules += _key_extractor_rules(f"{off}.attn.k_featurizer", f"{cm}.key_extractor", b, h, d)
        rules += _linear_rules(f"{off}.attn.v_featurizer.W_v", f"{cm}.value_extractor.linear_value", b, (d, d))
        rules += [
            (f"{off}.attn.v_featurizer.coef", (1, h, 1, 1), f"{cm}.value_extractor.mix", _scalar),
            (f"{off}.attn.v_featurizer.val_scale", (1, h, 1, 1), f"{cm}.value_extractor.value_scale", _scalar),
        ]
        rules += _linear_rules(f"{off}.attn.c_proj", f"{cm}.linear_proj", b, (d, d))
        rules += _linear_rules(f"{off}.ln_2", f"{ours}.pre_persistent_layernorm", b, (d,))
        rules += _key_extractor_rules(f"{off}.mlp.k_featurizer", f"{pm}.key_extractor", b, h, d)
        rules += [
            (f"{off}.mlp.P_k", (1, 1, h, p, hs), f"{pm}.memory_keys", _bank),
            (f"{off}.mlp.P_v", (1, 1, h, p, hs), f"{pm}.memory_values", _bank),
            (f"{off}.mlp.out_scale", (1, h, 1, 1), f"{pm}.output_scale", _scalar),
        ]
        rules += _linear_rules(f"{off}.mlp.c_proj", f"{pm}.linear_proj", b, (d, d))
    rules += _linear_rules("mosaic.ln_f", "decoder.final_layernorm", b, (d,))
    return rules


def _check_buffers(sd: Mapping[str, Tensor], shape: OfficialV1Shape, source: str) -> set[str]:
    """Validate the registered (non-learned) buffers; return their names.

    They are constants of the official architecture (a strictly-lower-triangular mask and the
    -(t - s) lag table of the leaky average). Our model rebuilds both, so a checkpoint whose
    buffers hold anything else would not compute what its owner trained: refuse it.
    """
    seen = set()
    n = shape.block_size
    for name, t in sd.items():
        m = _LAYER_KEY.match(name)
        if not m:
            continue
        suffix = name[m.end():]
        if suffix == "attn.bias":
            want = torch.ones(n, n).tril(-1).bool().view(1, 1, n, n)
        elif suffix in ("attn.k_featurizer.leaky_avg.coef", "mlp.k_featurizer.leaky_avg.coef"):
            pos = torch.arange(t.shape[-1], dtype=torch.float32)
            lag = pos[:, None] - pos[None, :]
            want = torch.where(lag >= 0, -lag, torch.zeros_like(lag))
            if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] < n:
                raise OfficialCheckpointError(
                    f"{source}: buffer {name!r} has shape {tuple(t.shape)}, expected ({n}, {n}) or larger"
                )
        else:
            continue
        if t.shape != want.shape or not torch.equal(t.to(want.dtype), want):
            raise OfficialCheckpointError(
                f"{source}: buffer {name!r} (shape {tuple(t.shape)}) is not the official constant of shape "
                f"{tuple(want.shape)}; a modified mask/lag table cannot be imported exactly"
            )
        seen.add(name)
    return seen


def _listed_problems(*named_lists: tuple[str, list[str]]) -> list[str]:
    """``"label: [first 8 names] ..."`` for each non-empty list: one readable error line however
    many keys are wrong."""
    return [f"{label}: {names[:8]}{' ...' if len(names) > 8 else ''}" for label, names in named_lists if names]


def map_official_state_dict(
    sd: Mapping[str, Tensor], shape: OfficialV1Shape, source: str = "state dict"
) -> dict[str, Tensor]:
    """Rename/reshape every official tensor to our names; error on anything missing, extra or misshapen."""
    rules = official_rules(shape)
    missing = [off for off, _, _, _ in rules if off not in sd]
    buffers = _check_buffers(sd, shape, source) if shape.block_size is not None else set()
    known = {off for off, _, _, _ in rules} | buffers | {"lm_head.weight"}
    unexpected = sorted(set(sd) - known)
    misshapen = [
        f"{off}: {tuple(sd[off].shape)} (expected {want})"
        for off, want, _, _ in rules
        if off in sd and tuple(sd[off].shape) != want
    ]
    if "lm_head.weight" not in sd:
        missing.append("lm_head.weight")
    problems = _listed_problems(
        ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshapen)
    )
    if problems:
        arch = (
            f"{shape.n_layer} layers, {shape.n_head} heads, n_embd {shape.n_embd}, vocab {shape.vocab_size}, "
            f"pmem_size {shape.pmem_size}, bias {shape.bias}"
        )
        raise OfficialCheckpointError(f"{source} does not match an official v1 model of {arch}: " + "; ".join(problems))
    if not torch.equal(sd["lm_head.weight"], sd["mosaic.wte.weight"]):
        raise OfficialCheckpointError(
            f"{source}: lm_head.weight differs from mosaic.wte.weight; the official model ties them and so "
            "does ours (v1), so an untied checkpoint cannot be imported exactly"
        )
    if any(not t.is_floating_point() for off, _, _, _ in rules for t in [sd[off]]):
        raise OfficialCheckpointError(f"{source}: a parameter tensor is not floating point")
    return {ours: fn(sd[off]) for off, _, ours, fn in rules}


# ---------------------------------------------------------------------------------------------
# Loading into our model


def loadable_tensors(model: torch.nn.Module, keep_vars: bool = False) -> dict[str, Tensor]:
    """``model.state_dict()`` without Megatron's ``_extra_state`` entries (Transformer Engine
    metadata, not weights), each memory's fused projection seen as its separate linears
    (``key_extractor.linear_key.weight`` ...; model/fused_projection.py): the tensors a complete
    mapped state dict must provide, in the names every converter and checkpoint uses."""
    from .fused_projection import logical_tensors  # Megatron-dependent: not at import time

    own = {k: v for k, v in model.state_dict(keep_vars=keep_vars).items() if not k.endswith("_extra_state")}
    return logical_tensors(model, own)


def load_mapped_state_dict(
    model: torch.nn.Module,
    mapped: Mapping[str, Tensor],
    source: str = "state dict",
    *,
    error: type[Exception] = OfficialCheckpointError,
) -> None:
    """Copy ``mapped`` (our names) into ``model`` and prove nothing was left out on either side.

    Errors (``error``, default OfficialCheckpointError) if a mapped tensor has no home in the
    model, if a model parameter or persistent buffer would keep its initial value, or on any
    shape mismatch. ``_extra_state`` entries are left as they are (see :func:`loadable_tensors`).
    Tensors are cast to the model's dtypes. Also the loader of the Hugging Face importer
    (``megatron_mosaic.hf.importer``), which passes its own ``ConversionError``.
    """
    own = loadable_tensors(model)
    missing = sorted(set(own) - set(mapped))
    extra = sorted(set(mapped) - set(own))
    misshapen = [f"{k}: ours {tuple(own[k].shape)}, mapped {tuple(v.shape)}"
                 for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    problems = _listed_problems(
        ("model tensors with no official source", missing),
        ("mapped tensors the model does not have", extra),
        ("shape mismatches", misshapen),
    )
    if problems:
        raise error(f"{source}: cannot load into {type(model).__name__}: " + "; ".join(problems))
    with torch.no_grad():  # the fused projections' parts are views: copying fills the fused weights
        for name, tensor in loadable_tensors(model, keep_vars=True).items():
            if name in mapped:
                tensor.copy_(mapped[name])
    # Every parameter (tied ones are shared objects) must now hold exactly what was mapped (a
    # fused weight: its parts, and zeros in its pad).
    from .fused_projection import fused_tensors

    physical = fused_tensors(model, mapped)
    after = model.state_dict()
    for name, param in model.named_parameters():
        if name not in physical:
            raise error(f"{source}: model parameter {name!r} was not filled")
    for name, value in physical.items():
        if not torch.equal(after[name], value.to(after[name].dtype)):
            raise error(f"{source}: {name!r} does not hold the imported value after loading")
