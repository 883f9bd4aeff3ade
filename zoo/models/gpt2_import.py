"""GPT-2 weights <-> the zoo's GPT params (zoo.models.gpt), from a PyTorch / Hugging Face
`GPT2LMHeadModel` state_dict in a safetensors file, a torch file, or a dict in memory. Nothing
downloads: point it at a file you have.

The architectures are the same (pre-LN blocks, tanh GELU, learned positions, tied output layer);
the mapping only renames and splits tensors. Hugging Face's `Conv1D` stores weights as
[in, out], which is Flax's kernel layout, so kernels are copied untransposed; `c_attn` holds q, k
and v side by side ([H, 3H]) and is split into the zoo's query/key/value. Keys may carry the
`transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model, the original OpenAI checkpoints);
buffers (`attn.bias`, `attn.masked_bias`) and the tied `lm_head.weight` are not parameters.

safetensors files are read and written by a small NumPy implementation of the format (an 8-byte
little-endian header size, a JSON header of dtype/shape/offsets, then raw little-endian bytes), so
neither torch nor the safetensors package is needed for them.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Mapping

import numpy as np

from zoo.errors import DataError
from zoo.models.gpt import GPTConfig

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------------- safetensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: array} from a .safetensors file (bf16 tensors are widened to float32)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a safetensors file ({e})") from None
    out, base = {}, 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = raw[base + start: base + end]
        if meta["dtype"] == "BF16":  # bfloat16: the top half of a float32
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif meta["dtype"] in _ST_DTYPES:
            arr = np.frombuffer(buf, np.dtype(_ST_DTYPES[meta["dtype"]]).newbyteorder("<"))
        else:
            raise DataError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        out[name] = arr.reshape(meta["shape"]).copy()
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> str:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name}: unsupported dtype {arr.dtype}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))
    return path


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A GPT-2 state_dict from .safetensors (no torch needed) or a torch file (.bin/.pt/.pth)."""
    if not os.path.isfile(path):
        raise DataError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        import torch
    except ImportError:
        raise DataError(f"{path}: reading torch files needs PyTorch (pip install 'zoo[peers]'), "
                        "or convert it to .safetensors") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


# ------------------------------------------------------------------------------------- mapping


def _strip(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):  # a torch tensor
            v = v.detach().float().cpu().numpy()
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        if k == "lm_head.weight" or k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        out[k] = np.asarray(v, np.float32)
    return out


def gpt2_config(state_dict: Mapping[str, Any], num_heads: int) -> GPTConfig:
    """The GPTConfig of a GPT-2 state_dict (num_heads is not recorded in the weights)."""
    sd = _strip(state_dict)
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise DataError("not a GPT-2 state_dict: no wte.weight / wpe.weight "
                        f"(keys start {sorted(state_dict)[:3]})")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))}
    V, H = sd["wte.weight"].shape
    return GPTConfig(vocab_size=V, max_len=sd["wpe.weight"].shape[0], num_layers=len(layers), hidden=H,
                     num_heads=num_heads, mlp_ratio=sd["h.0.mlp.c_fc.weight"].shape[1] / H)


def from_gpt2(state_dict: Mapping[str, Any], num_heads: int) -> tuple[GPTConfig, dict]:
    """(GPTConfig, params) for zoo.models.gpt from a GPT-2 state_dict."""
    cfg = gpt2_config(state_dict, num_heads)
    sd = _strip(state_dict)
    used = set()

    def get(name):
        if name not in sd:
            raise DataError(f"GPT-2 state_dict lacks {name}")
        used.add(name)
        return sd[name]

    def dense(prefix):
        return {"kernel": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    def ln(prefix):
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    H = cfg.hidden
    stack = {"ln_f": ln("ln_f")}
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        w, b = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")
        if w.shape != (H, 3 * H):
            raise DataError(f"{p}attn.c_attn.weight has shape {w.shape}, expected {(H, 3 * H)}")
        attn = {name: {"kernel": w[:, j * H:(j + 1) * H], "bias": b[j * H:(j + 1) * H]}
                for j, name in enumerate(("query", "key", "value"))}
        attn["out"] = dense(p + "attn.c_proj")
        stack[f"block_{i}"] = {"ln_1": ln(p + "ln_1"), "attn": attn, "ln_2": ln(p + "ln_2"),
                               "mlp": {"fc": dense(p + "mlp.c_fc"), "proj": dense(p + "mlp.c_proj")}}
    params = {"wte": {"embedding": get("wte.weight")}, "wpe": get("wpe.weight"), "stack": stack}
    left = sorted(set(sd) - used)
    if left:
        raise DataError(f"GPT-2 state_dict has tensors the zoo's GPT does not use: {left[:5]}")
    return cfg, params


def to_gpt2(cfg: GPTConfig, params) -> dict[str, np.ndarray]:
    """A GPT2LMHeadModel state_dict (numpy arrays, `transformer.` keys, tied lm_head) from GPT params."""
    if cfg.kv_heads != cfg.num_heads:
        raise ValueError("GPT-2 has no grouped-query attention: num_kv_heads must equal num_heads")
    p = params
    a = lambda x: np.asarray(x, np.float32)
    sd = {"transformer.wte.weight": a(p["wte"]["embedding"]), "transformer.wpe.weight": a(p["wpe"]),
          "transformer.ln_f.weight": a(p["stack"]["ln_f"]["scale"]),
          "transformer.ln_f.bias": a(p["stack"]["ln_f"]["bias"])}
    for i in range(cfg.num_layers):
        blk, pre = p["stack"][f"block_{i}"], f"transformer.h.{i}."
        at = blk["attn"]
        sd[pre + "attn.c_attn.weight"] = np.concatenate([a(at[n]["kernel"]) for n in ("query", "key", "value")], 1)
        sd[pre + "attn.c_attn.bias"] = np.concatenate([a(at[n]["bias"]) for n in ("query", "key", "value")])
        for ours, theirs in (("out", "attn.c_proj"),):
            sd[pre + theirs + ".weight"], sd[pre + theirs + ".bias"] = a(at[ours]["kernel"]), a(at[ours]["bias"])
        for ours, theirs in (("fc", "mlp.c_fc"), ("proj", "mlp.c_proj")):
            sd[pre + theirs + ".weight"] = a(blk["mlp"][ours]["kernel"])
            sd[pre + theirs + ".bias"] = a(blk["mlp"][ours]["bias"])
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            sd[pre + theirs + ".weight"], sd[pre + theirs + ".bias"] = a(blk[ours]["scale"]), a(blk[ours]["bias"])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def load_gpt2(path: str, num_heads: int) -> tuple[GPTConfig, dict]:
    """(GPTConfig, params) from a GPT-2 weights file (.safetensors or a torch file)."""
    return from_gpt2(load_state_dict(path), num_heads)
