"""Fixes for megatron-core 0.16.1's DistributedOptimizer on its plain-torch-Adam fallback.

Without Transformer Engine or Apex, megatron-core steps ``torch.optim.AdamW``, which keeps a
``step`` tensor per parameter where TE/Apex keep one per group. Its checkpoint code handles
that ``step`` wrongly in four places. This hits every install without TE/Apex (GPU ones too),
so unlike ``cuda_compat`` these patches are installed on GPU machines as well:

1. ``fresh_state_dict``: ``DistributedOptimizer.state_dict`` asserts exactly one distinct step
   among the per-parameter states; before the first step there is no state at all, so every
   ``sharded_state_dict(is_loading=True)`` (i.e. every load) fails. The state is given its
   fresh value (step 0) for the duration of the call.
2. ``shared_step``: ``load_state_dict`` gives every parameter *the same* step tensor; torch's
   AdamW increments each parameter's step in place, so after a resume the step advances once
   per parameter per iteration (the bias correction goes wrong: weights off by ~2e-4 after one
   step). Each parameter gets its own copy.
3. ``restored_step``: ``_set_main_param_and_optimizer_states`` copies every state key, ``step``
   included, from the per-parameter tensors of the checkpoint. Those carry no step (it lives
   in the param groups, restored by ``load_state_dict``): with ``dp_reshardable`` it copies
   the stale pre-load value back over the restored one (the bias correction restarts at 1),
   with ``fully_reshardable`` it raises ``KeyError: 'step'``. The restored step is kept.
4. ``dp_reshardable_no_grad``: ``load_parameter_state_from_dp_reshardable`` copies into the
   main parameters without ``torch.no_grad()`` (its siblings have it).

Only active when megatron-core uses the torch fallback (``HAVE_APEX_OR_TE`` false). Each patch
is shown to still be needed by ``tests/training/test_megatron_patches.py`` (the unpatched
call fails); when an upgrade fixes one, that test fails and the patch should be dropped.
"""

from __future__ import annotations

import functools
import inspect

import torch

from megatron_mosaic.training.patch_set import PatchSet

TESTED_MEGATRON_CORE_VERSIONS = ("0.16.1",)
PATCHES = ("fresh_state_dict", "shared_step", "restored_step", "dp_reshardable_no_grad")


def _fresh_state_dict(original):
    @functools.wraps(original)
    def state_dict(self):
        if len(self.optimizer.state) > 0:
            return original(self)
        # What torch's AdamW would hold before its first step, removed again afterwards so the
        # optimizer still initialises its moments lazily.
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                self.optimizer.state[param]["step"] = torch.tensor(0.0)
        try:
            return original(self)
        finally:
            self.optimizer.state.clear()
    return state_dict


def _own_steps(original):
    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()
    return load_state_dict


def _keep_restored_step(original):
    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:  # copying the step onto itself leaves it as restored
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)
    return set_states


def _no_grad(original):
    return torch.no_grad()(original)


_WRAPPERS = {
    "fresh_state_dict": ("state_dict", _fresh_state_dict),
    "shared_step": ("load_state_dict", _own_steps),
    "restored_step": ("_set_main_param_and_optimizer_states", _keep_restored_step),
    "dp_reshardable_no_grad": ("load_parameter_state_from_dp_reshardable", _no_grad),
}


def needed() -> bool:
    """True when megatron-core steps torch's Adam (no TE/Apex): the case these patches fix."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _targets() -> dict:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # Each wrapper wraps what is there now: the original, since apply() only installs a patch
    # that is not in place (the wrappers of patches already in place are discarded).
    return {name: [(DistributedOptimizer, attr, wrap(inspect.getattr_static(DistributedOptimizer, attr)))]
            for name, (attr, wrap) in _WRAPPERS.items()}


_patches = PatchSet("megatron_patches", PATCHES, _targets, needed=needed,
                    tested_versions=TESTED_MEGATRON_CORE_VERSIONS,
                    test_file="tests/training/test_megatron_patches.py")
is_active, apply, revert, unpatched = _patches.is_active, _patches.apply, _patches.revert, _patches.unpatched
