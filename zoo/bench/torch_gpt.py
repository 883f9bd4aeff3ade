"""gpt_step's peer: the same GPT-2 train step in PyTorch, as nanoGPT writes it (Karpathy's
`model.py` / `train.py`): one `c_attn` Linear for q, k and v, `F.scaled_dot_product_attention`
(causal), tanh GELU, pre-LN blocks, the output layer tied to the token embedding, the loss
`F.cross_entropy` over the logits; bf16 compute under `torch.autocast` with float32 params (the
zoo's "bfloat16" dtype), AdamW (fused on CUDA) with the zoo bench's settings (lr 3e-4, weight
decay 0.1 on every parameter, as `optax.adamw` applies it) and the gradients' global norm, as the
zoo's step reports it. "compiled" wraps the model in `torch.compile` (nanoGPT's `compile=True`).

The weights come from the zoo's own init through `zoo.models.gpt2_import.to_gpt2` (Hugging Face's
[in, out] Conv1D kernels transposed to Linear's [out, in]), so both sides start from one model:
in float32 their first losses agree to float32 rounding (tests/bench/test_torch_gpt.py).

Imports torch: only `zoo.bench.gpt_step` imports this module, and only when torch is installed.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoo.models.gpt import GPTConfig
from zoo.models.gpt2_import import to_gpt2


class _Block(nn.Module):
    def __init__(self, H: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(H, eps=1e-5), nn.LayerNorm(H, eps=1e-5)
        self.c_attn, self.attn_proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.c_fc, self.mlp_proj = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)

    def forward(self, x):
        B, T, H = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(H, dim=2)
        q, k, v = (t.view(B, T, self.heads, H // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, H))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """nanoGPT's GPT: tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.mlp_ratio != 4.0 or cfg.kv_heads != cfg.num_heads:
            raise ValueError("the PyTorch peer is GPT-2's architecture: mlp_ratio 4, no grouped-query attention")
        H = cfg.hidden
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, H), nn.Embedding(cfg.max_len, H)
        self.h = nn.ModuleList(_Block(H, cfg.num_heads) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(H, eps=1e-5)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # the tied output layer (nanoGPT's lm_head)


_NAMES = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}


def from_zoo(cfg: GPTConfig, params, device="cpu") -> TorchGPT:
    """A TorchGPT holding the zoo GPT's params (float32)."""
    sd = to_gpt2(cfg, params)
    mine = {}
    for name, arr in sd.items():
        if name == "lm_head.weight":
            continue
        name = name.removeprefix("transformer.")
        for theirs, ours in _NAMES.items():
            if f".{theirs}." in name:
                name = name.replace(theirs, ours)
                arr = arr.T if name.endswith(".weight") else arr  # Conv1D [in, out] -> Linear [out, in]
                break
        mine[name] = torch.from_numpy(np.array(arr, np.float32))  # a writable copy
    model = TorchGPT(cfg)
    model.load_state_dict(mine, strict=True)
    return model.to(device)


def make_step(cfg: GPTConfig, params, *, compiled: bool = False, lr: float = 3e-4, weight_decay: float = 0.1,
              device: str | None = None):
    """(step(x [B, T+1] int64 tensor) -> (loss, grad norm) tensors, device): one train step as
    nanoGPT's loop runs it, on the given (default: CUDA if present) device."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_zoo(cfg, params, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                            fused=device == "cuda")
    net = torch.compile(model) if compiled else model
    bf16 = cfg.dtype == "bfloat16"

    def step(x):
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = net(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in model.parameters()])))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), norm

    return step, device


def time_steps(step, x, device: str, iters: int):
    """(first three losses, median synced step s, pipelined step s): synced waits for each step's
    loss (`.item()`), pipelined queues `iters` steps and waits once, as gpt_step's zoo rows do."""
    first = [float(step(x)[0].item()) for _ in range(3)]
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step(x)[0].item()
        times.append(time.perf_counter() - t)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        loss, _ = step(x)
    loss.item()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    pipelined = (time.perf_counter() - t) / iters
    if not all(math.isfinite(v) for v in first):
        raise FloatingPointError(f"the PyTorch peer's first losses are not finite: {first}")
    return first, float(np.median(times)), pipelined


def free():
    """Return the peer's cached device memory (JAX allocates from the same GPU afterwards)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
