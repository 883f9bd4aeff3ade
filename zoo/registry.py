"""Model registry: name -> (description, default config, build).

A model file registers itself with `@register(name, description, config_fn)` on a function
`build(model_cfg, info) -> ModelDef`, where `model_cfg` is the `model` block of the config and
`info` describes the data (see `zoo.data.Source.info`). The default config is the full config
(base + the model's overrides) that `zoo train NAME` runs with no overrides.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import ml_collections

from zoo.errors import ConfigError, unknown

if TYPE_CHECKING:  # zoo.models imports this module to register itself
    from zoo.models.base import ModelDef

_REGISTRY: dict[str, "ModelEntry"] = {}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    config: Callable[[], ml_collections.ConfigDict]
    build: Callable[[ml_collections.ConfigDict, dict[str, Any]], ModelDef]
    samples: str | None = None   # what `sample` returns: "topics" (word ids per topic); None = like the data


def register(name: str, description: str, config: Callable[[], ml_collections.ConfigDict], *,
             samples: str | None = None):
    """Decorator: register `build(model_cfg, info) -> ModelDef` under `name`."""

    def wrap(build):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, description, config, build, samples)
        return build

    return wrap


def _load_models() -> None:
    import zoo.models  # noqa: F401  (each model module registers itself on import)


def get(name: str) -> ModelEntry:
    _load_models()
    if name not in _REGISTRY:
        raise ConfigError(unknown("model", name, _REGISTRY))
    return _REGISTRY[name]


def names() -> list[str]:
    _load_models()
    return sorted(_REGISTRY)
