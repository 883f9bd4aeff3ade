"""Dotted `key=value` overrides of an ml_collections config, typed by the value they replace."""

from __future__ import annotations

import ast

import ml_collections

from zoo.errors import ConfigError, unknown


def _parse(key: str, raw: str, old):
    if isinstance(old, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"bad value for {key}: {raw!r} (expected a bool: true or false)")
    if isinstance(old, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"bad value for {key}: {raw!r} (expected {type(old).__name__})") from None
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(old, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(old, (tuple, list)):
        value = (value,) if not isinstance(value, (tuple, list)) else value
        return type(old)(value)
    if old is not None and (isinstance(value, bool) or not isinstance(value, type(old))):
        raise ConfigError(f"bad value for {key}: {raw!r} (expected {type(old).__name__})")
    return value


def apply_overrides(config: ml_collections.ConfigDict, items: list[str]) -> ml_collections.ConfigDict:
    """Apply ["a.b=1", ...]; unknown keys and ill-typed values raise ConfigError naming the valid."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: expected key=value (e.g. optimizer.lr=3e-4)")
        key, raw = item.split("=", 1)
        node, parts = config, key.strip().split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "config"
                valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ConfigError(unknown(f"config key in {where}:", part, valid) if valid
                                  else f"unknown config key {key!r}: {where} is not a group")
            if i < len(parts) - 1:
                node = node[part]
        old = node[parts[-1]]
        if isinstance(old, ml_collections.ConfigDict):
            raise ConfigError(f"{key} is a group; set one of its keys: {', '.join(sorted(old.keys()))}")
        with node.unlocked():
            node[parts[-1]] = _parse(key, raw.strip(), old)
    return config
