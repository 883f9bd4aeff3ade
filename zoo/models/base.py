"""The model contract: a NamedTuple of pure functions (in the spirit of optax.GradientTransformation).

Shapes: B batch, the rest per model. `Batch` is a dict of arrays with leading dim B; the loaders add
`idx` (int32 [B]): each example's position in the *global* batch, so per-example randomness drawn
with `zoo.ops.random.example_keys(key, batch["idx"])` is the same on one device, many, or pmap.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any
Batch = dict[str, Array]
Metrics = dict[str, Array]


class ModelDef(NamedTuple):
    """What the loop, `zoo sample` and `zoo eval` need from a model.

    init(key, batch) -> params
    loss(params, key, batch) -> (scalar loss, {name: scalar})     the loop minimises the scalar
    sample(params, key, n) -> array                               n is static
    step(state, key, batch) -> (state, metrics)                   only for non-gradient updates
    evaluate(params, key, batch) -> {name: [B] per-example value} held-out metrics; `zoo eval`
                                                                  averages them over the test split
    init_extra(key, batch) -> extra                               model-owned state kept in
                                                                  TrainState.extra (PCD chains, ...)
    generate(params, key, request) -> {"text": [str], "images": {name: [N, H, W, C] in [0, 1]}}
        what `zoo sample` runs when the model has it (host code; it jits what it needs). `request`
        holds the CLI's sampling options, None where not given: n, prompt (str), max_new_tokens,
        temperature, top_k, top_p, sampler, steps, guidance, label. Either key of the result may
        be missing; `zoo sample` prints the texts and writes each image grid as WORKDIR/NAME.png.
    trainable(params) -> pytree of bools                          only the True leaves are trained
                                                                  (an optax mask: LoRA, soft prompts)
    sample_options: the request keys `generate` reads; `zoo sample` refuses the others (a model
        without `generate` takes only n). None: not declared, nothing refused.

    With `init_extra`, the loss is stateful: loss(params, key, batch, extra) ->
    (scalar, (metrics, new_extra)); the loop differentiates the scalar w.r.t. params only and
    carries new_extra to the next step (and into checkpoints).
    """

    init: Callable[[PRNGKey, Batch], Params]
    loss: Callable[[Params, PRNGKey, Batch], tuple[Array, Metrics]]
    sample: Callable[[Params, PRNGKey, int], Array] | None = None
    step: Callable[[Any, PRNGKey, Batch], tuple[Any, Metrics]] | None = None
    evaluate: Callable[[Params, PRNGKey, Batch], Metrics] | None = None
    init_extra: Callable[[PRNGKey, Batch], Any] | None = None
    generate: Callable[[Params, PRNGKey, dict], dict] | None = None
    trainable: Callable[[Params], Any] | None = None
    sample_options: tuple[str, ...] | None = None


def request_top_k(request: dict, vocab_size: int) -> int | None:
    """A `generate` request's top_k, capped at the vocabulary (a larger k keeps every token, as in
    Hugging Face's generate); None when not given."""
    k = request.get("top_k")
    return None if k is None else min(int(k), vocab_size)
