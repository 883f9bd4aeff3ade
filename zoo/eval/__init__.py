"""Metrics shared across model families: IWAE NLL, bits/dim (more: AIS, perplexity, FID)."""

from zoo.eval.likelihood import bits_per_dim, elbo_from_log_w, iwae_bound, nats_to_bits

__all__ = ["bits_per_dim", "elbo_from_log_w", "iwae_bound", "nats_to_bits"]
