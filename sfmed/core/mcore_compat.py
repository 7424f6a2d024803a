"""Workarounds for megatron-core 0.16 on its pure-PyTorch optimizer path (no apex, no TE).

Without apex or Transformer Engine, ``get_megatron_optimizer`` falls back to
``torch.optim.AdamW``, whose per-parameter state holds a ``step`` tensor. Two places of
``DistributedOptimizer`` do not expect that in 0.16:

* ``state_dict()`` asserts every parameter already has a ``step`` — true only after the first
  update, so a fresh optimizer can neither be loaded into (resume) nor saved;
* the model-space loaders (``fully_reshardable``, ``fully_sharded_model_space``) hand
  ``_set_main_param_and_optimizer_states`` the tensors without ``step`` (restored separately
  from the param groups) but that method copies every key of the live state, ``step`` included,
  and raises ``KeyError: 'step'``;
* ``load_state_dict()`` gives every parameter the *same* ``step`` tensor object, and PyTorch's
  Adam increments steps in place — after a resume the shared step grows by the number of
  parameters per update, so the bias correction (and every update) differs from an
  uninterrupted run.

All three are fixed here per optimizer instance (nothing global is patched). On GPUs with TE's or
apex's fused Adam neither applies and these functions change nothing.
"""

from __future__ import annotations

import types

import torch


def _torch_adam_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield opt, inner


def prime_optimizer_state(optimizer) -> None:
    """Give an untouched PyTorch Adam zero state and ``step`` so it can be (de)serialised."""
    for _, torch_opt in _torch_adam_optimizers(optimizer):
        for group in torch_opt.param_groups:
            for p in group["params"]:
                st = torch_opt.state[p]
                if "step" not in st:
                    st.setdefault("exp_avg", torch.zeros_like(p.data))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                    st["step"] = torch.tensor(0.0)


def _set_states_keeping_step(self, model_param, tensors):
    # `step` was already restored from the param groups; copy everything else.
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    state = self.optimizer.state[main_param]
    step = state.pop("step", None) if "step" not in tensors else None
    try:
        type(self)._set_main_param_and_optimizer_states(self, model_param, tensors)
    finally:
        if step is not None:
            state["step"] = step


def fix_torch_adam_loading(optimizer) -> None:
    """Make the model-space optimizer loaders work with PyTorch Adam (see module docstring)."""
    for opt, _ in _torch_adam_optimizers(optimizer):
        if hasattr(opt, "model_param_group_index_map") and not getattr(
            opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
        ):
            opt._set_main_param_and_optimizer_states = types.MethodType(
                _set_states_keeping_step, opt
            )


def unshare_adam_steps(optimizer) -> None:
    """Give each parameter its own ``step`` tensor after ``optimizer.load_state_dict``."""
    for _, torch_opt in _torch_adam_optimizers(optimizer):
        for st in torch_opt.state.values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].detach().clone()
