"""The classic attention of RNN encoder-decoders, as pure functions: additive (Bahdanau et al. 2015,
eq. 6 and appendix A.1.2: score = v_a^T tanh(W_q q + W_k k)) and multiplicative (Luong et al. 2015,
eq. 8: "general" q^T W k, "dot").

Shape letters: B batch, S key length, H hidden size, A attention size.
"""

from __future__ import annotations

import jax.numpy as jnp

from zoo.ops.attention.masks import masked_softmax

def _attend(scores_BxS, keys_BxSxH, mask):
    """Softmax the scores over visible keys and average the keys: (context [B, H], weights [B, S])."""
    valid = jnp.ones(scores_BxS.shape, bool) if mask is None else jnp.asarray(mask, bool)
    weights_BxS = masked_softmax(scores_BxS.astype(jnp.float32), valid)
    context = jnp.einsum("bs,bsh->bh", weights_BxS, keys_BxSxH.astype(jnp.float32))
    return context.astype(keys_BxSxH.dtype), weights_BxS


def additive_attention(query_BxH, keys_BxSxH, W_q, W_k, v_a, *, mask=None):
    """Bahdanau attention: score_s = v_a . tanh(query W_q + key_s W_k); W_q [Hq, A], W_k [Hk, A], v_a [A].

    mask [B, S] bool, True = attend; a row with no visible key gets zero weights and context.
    """
    if query_BxH.ndim != 2 or keys_BxSxH.ndim != 3 or W_q.shape != (query_BxH.shape[1], v_a.shape[0]) \
            or W_k.shape != (keys_BxSxH.shape[2], v_a.shape[0]):
        raise ValueError(f"additive_attention wants query [B, Hq], keys [B, S, Hk], W_q [Hq, A], "
                         f"W_k [Hk, A], v_a [A]; got {query_BxH.shape}, {keys_BxSxH.shape}, "
                         f"{W_q.shape}, {W_k.shape}, {v_a.shape}")
    hidden_BxSxA = jnp.tanh((query_BxH @ W_q)[:, None, :] + keys_BxSxH @ W_k)
    return _attend(hidden_BxSxA @ v_a, keys_BxSxH, mask)


def multiplicative_attention(query_BxH, keys_BxSxH, W=None, *, mask=None):
    """Luong attention: score_s = query . W key_s ("general", W [Hq, Hk]) or query . key_s (W=None, "dot")."""
    Hk = keys_BxSxH.shape[-1]
    want = (query_BxH.shape[-1], Hk) if W is not None else None
    if query_BxH.ndim != 2 or keys_BxSxH.ndim != 3 or (W is None and query_BxH.shape[-1] != Hk) \
            or (W is not None and W.shape != want):
        raise ValueError(f"multiplicative_attention wants query [B, Hq], keys [B, S, Hk], W [Hq, Hk] "
                         f"(or W=None with Hq == Hk); got {query_BxH.shape}, {keys_BxSxH.shape}, "
                         f"{None if W is None else W.shape}")
    projected_BxHk = query_BxH if W is None else query_BxH @ W
    return _attend(jnp.einsum("bh,bsh->bs", projected_BxHk, keys_BxSxH), keys_BxSxH, mask)
