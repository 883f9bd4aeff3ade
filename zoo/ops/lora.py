"""LoRA as pytree functions (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A LoRA layer is a dict holding "kernel" [I, O] and the adapters "lora_a" [I, r] and "lora_b" [r, O]
(b starts at zero, so training starts from the pretrained function); its output is
x @ (kernel + (alpha / r) * lora_a @ lora_b) (eq. 3). These functions take and return params
pytrees (nested dicts of arrays) and import no Flax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

LORA_KEYS = ("lora_a", "lora_b")


def _is_lora_layer(node) -> bool:
    return isinstance(node, dict) and "kernel" in node and all(k in node for k in LORA_KEYS)


def merge_lora(params: Any, alpha: float) -> Any:
    """Fold every adapter into its kernel: kernel + (alpha / r) * a @ b; the adapters are dropped.

    The merged tree has the shape of the same model built without adapters, and gives the same
    outputs as the unmerged one.
    """
    if _is_lora_layer(params):
        a, b = params["lora_a"], params["lora_b"]
        delta = (alpha / a.shape[1]) * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
        merged = {k: v for k, v in params.items() if k not in LORA_KEYS}
        merged["kernel"] = (params["kernel"].astype(jnp.float32) + delta).astype(params["kernel"].dtype)
        return merged
    if isinstance(params, dict):
        return {k: merge_lora(v, alpha) for k, v in params.items()}
    return params


def lora_mask(params: Any) -> Any:
    """A pytree of bools shaped like params: True on adapter leaves (the only ones LoRA trains)."""

    def walk(node, name=None):
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        return name in LORA_KEYS

    return walk(params)


def count_params(params: Any, mask: Any = None) -> int:
    """Number of scalars in params (only where mask is True, when given)."""
    leaves = jax.tree.leaves(params)
    if mask is None:
        return sum(int(x.size) for x in leaves)
    return sum(int(x.size) for x, m in zip(leaves, jax.tree.leaves(mask)) if m)
