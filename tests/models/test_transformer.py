"""Encoder-decoder Transformer: padding and causality invariances, greedy decoding against a
teacher-forced re-run, cross-attention maps, the masked loss against NumPy, config errors."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.errors import ConfigError, DataError
from zoo.models.seq2seq import BOS, EOS, PAD
from zoo.models.transformer import TransformerConfig, make_transformer, make_transformer_fns

CFG = TransformerConfig(vocab_size=20, hidden=16, num_heads=2, encoder_layers=1, decoder_layers=2)
_FNS = make_transformer_fns(CFG)
# jitted, as the model runs them: op by op, the module fixture's init and the first test's two
# calls took 11-12 s each on 2 cores, every op compiled on its own
FNS = _FNS._replace(init=jax.jit(_FNS.init), run_teacher_forced=jax.jit(_FNS.run_teacher_forced),
                    run_greedy=jax.jit(_FNS.run_greedy, static_argnums=2))


def _batch(seed=0, B=3, S=7, T=5):
    r = np.random.default_rng(seed)
    x = r.integers(3, 20, (B, S)).astype(np.int32)
    x[0, 5:] = PAD  # a padded input
    y = np.concatenate([np.full((B, 1), BOS), r.integers(3, 20, (B, T)), np.full((B, 1), EOS)], 1).astype(np.int32)
    y[1, -2:] = PAD
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


@jax.jit
def _spread(params):  # spread the weights so greedy paths vary
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.5 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def params():
    return _spread(FNS.init(jax.random.key(0), _batch()["x"]))


def test_padding_does_not_change_the_output(params):
    b = _batch()
    x_more_pad = jnp.concatenate([b["x"], jnp.zeros((3, 4), jnp.int32)], 1)
    a, _ = FNS.run_teacher_forced(params, b["x"], b["y"][:, :-1])
    c, _ = FNS.run_teacher_forced(params, x_more_pad, b["y"][:, :-1])
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_decoder_is_causal(params):
    b = _batch()
    y = b["y"][:, :-1]
    a, _ = FNS.run_teacher_forced(params, b["x"], y)
    c, _ = FNS.run_teacher_forced(params, b["x"], y.at[:, 4].set(7))
    np.testing.assert_allclose(np.asarray(a[:, :4]), np.asarray(c[:, :4]), atol=1e-6)
    assert np.abs(np.asarray(a[:, 4:] - c[:, 4:])).max() > 1e-4


def test_cross_attention_weights_are_distributions_over_real_inputs(params):
    b = _batch()
    _, w = FNS.run_teacher_forced(params, b["x"], b["y"][:, :-1])
    w = np.asarray(w)
    assert w.shape == (3, 6, 7)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(w[0, :, 5:] == 0.0)


def test_greedy_equals_teacher_forcing_on_its_own_output(params):
    b = _batch(seed=1)
    toks, _ = FNS.run_greedy(params, b["x"], 6)
    y_in = jnp.concatenate([jnp.full((3, 1), BOS, jnp.int32), toks[:, :-1]], 1)
    logits, _ = FNS.run_teacher_forced(params, b["x"], y_in)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), np.asarray(toks))
    assert len(set(np.asarray(toks).ravel().tolist())) > 1


def test_loss_is_masked_cross_entropy(params):
    b = _batch(seed=2)
    md = make_transformer(CFG)
    loss, _ = jax.jit(md.loss)(params, jax.random.key(0), b)
    logits, _ = FNS.run_teacher_forced(params, b["x"], b["y"][:, :-1])
    lg = np.asarray(logits, np.float64)
    lp = lg - lg.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    tgt = np.asarray(b["y"][:, 1:])
    per = [np.mean([-lp[i, t, tgt[i, t]] for t in range(tgt.shape[1]) if tgt[i, t] != PAD]) for i in range(3)]
    np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-5)
    out = jax.jit(md.evaluate)(params, jax.random.key(0), b)
    assert set(out) == {"exact_match", "token_accuracy", "nll"}
    np.testing.assert_allclose(np.asarray(out["nll"]), per, rtol=1e-5)


def test_bad_config_and_data():
    with pytest.raises(ConfigError, match="head size"):
        TransformerConfig(vocab_size=10, hidden=30, num_heads=4)
    from zoo import registry

    entry = registry.get("transformer")
    with pytest.raises(DataError, match="seq2seq data source"):
        entry.build(entry.config().model, {"kind": "text", "name": "pydocs"})
    bad = entry.config().model
    with bad.unlocked():
        bad.attention = "bahdanau"  # a seq2seq key the Transformer does not have
    with pytest.raises(ConfigError, match="model key"):
        entry.build(bad, {"kind": "seq2seq", "vocab_size": 10, "shape": (8,)})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_tanh_recomputes_in_the_backward(dtype, capsys):
    """The MLP's GELU: GPT-2's tanh formula in value and gradient (NumPy, float64), and under
    jax.checkpoint the backward keeps only h, never tanh(...) from the forward."""
    from jax.ad_checkpoint import print_saved_residuals

    from zoo.ops.gelu import gelu_tanh

    h = np.linspace(-6, 6, 97)
    t = np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))
    want = 0.5 * h * (1 + t)
    dwant = 0.5 * (1 + t) + 0.5 * h * (1 - t**2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * h**2)
    x = jnp.asarray(h, dtype)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2  # XLA's float32 tanh is good to ~3e-6
    np.testing.assert_allclose(np.asarray(gelu_tanh(x), np.float64), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(jax.grad(lambda x: gelu_tanh(x).sum())(x), np.float64), dwant,
                               rtol=tol, atol=tol)
    w = jnp.ones((97, 5), dtype)
    vec = {"float32": "f32", "bfloat16": "bf16"}[jnp.dtype(dtype).name] + "[97] "  # h-shaped residuals
    capsys.readouterr()
    print_saved_residuals(lambda x: jnp.sum(gelu_tanh(x) @ w), x)
    saved = [line for line in capsys.readouterr().out.splitlines() if line.startswith(vec)]
    assert len(saved) == 1 and "from the argument" in saved[0], saved  # h only: tanh is recomputed
    print_saved_residuals(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True) @ w), x)
    plain = [line for line in capsys.readouterr().out.splitlines() if line.startswith(vec)]
    assert len(plain) >= 3, plain  # what the checkpoint avoids: tanh (or 1 - tanh^2) and products


def test_bias_gelu_keeps_only_the_matmul_output(capsys):
    """bias_gelu_tanh(y, b) == gelu(y + b) in value and gradients (both arguments, float32: the
    closed-form derivative against autodiff of jax.nn.gelu), and its backward keeps y itself, not
    y + b nor tanh(...); LoRADense(gelu="tanh") is GELU of the plain layer, with the same
    parameters."""
    from jax.ad_checkpoint import print_saved_residuals

    from zoo.nn.transformer import LoRADense
    from zoo.ops.gelu import bias_gelu_tanh

    rng = np.random.default_rng(0)
    y, b = jnp.asarray(rng.standard_normal((6, 8)) * 2), jnp.asarray(rng.standard_normal(8))
    ref = lambda y, b: jnp.sum(jnp.sin(jax.nn.gelu(y + b, approximate=True)))  # noqa: E731
    got = lambda y, b: jnp.sum(jnp.sin(bias_gelu_tanh(y, b)))  # noqa: E731
    np.testing.assert_allclose(got(y, b), ref(y, b), rtol=1e-6)
    for g, r in zip(jax.grad(got, (0, 1))(y, b), jax.grad(ref, (0, 1))(y, b)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=3e-6)  # gradients of magnitude <= 1.2
    w = jnp.asarray(rng.standard_normal((6, 8)))
    capsys.readouterr()
    print_saved_residuals(lambda y, b: jnp.sum(bias_gelu_tanh(y, b) * w), y, b)
    saved = [line for line in capsys.readouterr().out.splitlines() if line.strip() and "constant" not in line]
    assert saved == ["f32[6,8] from the argument y", "f32[8] from the argument b"], saved  # w: a constant
    for rank in (0, 2):
        x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
        fused, plain = LoRADense(8, rank, gelu="tanh"), LoRADense(8, rank)
        params = fused.init(jax.random.key(1), x)
        assert jax.tree.structure(params) == jax.tree.structure(plain.init(jax.random.key(1), x))
        params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero bias and LoRA b
        np.testing.assert_allclose(fused.apply(params, x), jax.nn.gelu(plain.apply(params, x), approximate=True),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_sum_rows_f32_against_numpy(dtype):
    """sum_rows_f32: the float32 sum over all leading axes of x as stored (a bf16 x upcast from its
    bits, exactly), against NumPy's float64 sum of the same values."""
    from zoo.ops.linear import sum_rows_f32

    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 300, 7)) * 50, dtype)
    got = sum_rows_f32(x)
    want = np.asarray(x, np.float64).reshape(-1, 7).sum(0)
    assert got.dtype == jnp.float32 and got.shape == (7,)
    scale = np.abs(np.asarray(x, np.float64)).reshape(-1, 7).sum(0)
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - want), 1e-6 * scale + 1e-30)
    if dtype == jnp.bfloat16:  # every bf16 value (signs, zero, denormals, inf) upcast exactly
        bits = np.arange(2 ** 16, dtype=np.uint32)
        vals = jax.lax.bitcast_convert_type(jnp.asarray(bits.astype(np.uint16)), jnp.bfloat16)
        finite = np.isfinite(np.asarray(vals, np.float32))
        one = sum_rows_f32(vals[:, None])  # each a row of its own: sums of one value
        got_each = jax.vmap(lambda v: sum_rows_f32(v[None, None]))(vals)[:, 0]
        np.testing.assert_array_equal(np.asarray(got_each)[finite], np.asarray(vals, np.float32)[finite])
        assert np.isnan(np.asarray(one)).all()  # the sum over all of them includes +inf and -inf


@pytest.mark.parametrize("form", ["tanh", "sigmoid", "epilogue"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_gelu_forms_are_the_tanh_gelu_with_its_derivative_in_closed_form(form, dtype, capsys):
    """bias_gelu(y, b, form), h = y + b: GPT-2's tanh GELU, tanh(sqrt(2/pi) (h + 0.044715 h^3)),
    or written as h * sigmoid(2 sqrt(2/pi) (h + 0.044715 h^3)): value and y's gradient against
    NumPy's tanh formula in float64 (the hand-written derivatives included: a wrong constant fails
    it), float32 math for a bf16 y (one rounding, at the output); the bias gradient is the float32
    sum of y's gradient as returned (rounded to y's dtype; the sum of the unrounded one differs by
    ~2^-9 sqrt(rows) of it in bf16); the backward keeps y and the bias only. The "epilogue" form
    adds the bias in y's dtype first (add_bias, as the matmul's epilogue does) and keeps that sum,
    z, for its backward: in bf16 its value and gradient are the formula's at z as rounded (on a
    GPU the epilogue's value is GELU of the unrounded sum; its backward also reads z rounded).
    LoRADense / MLP with gelu="sigmoid" or "epilogue" equal gelu="tanh" on the same params, and an
    unknown form is a clear error."""
    from jax.ad_checkpoint import print_saved_residuals

    from zoo.nn.transformer import LoRADense
    from zoo.ops.gelu import bias_gelu

    rng = np.random.default_rng(5)
    y64, b64, g64 = rng.standard_normal((512, 6)) * 3, rng.standard_normal(6), rng.standard_normal((512, 6))
    y, g = jnp.asarray(y64, dtype), jnp.asarray(g64, dtype)
    b = jnp.asarray(b64, jnp.float32)
    h = np.asarray(y, np.float64) + np.asarray(b, np.float64)  # y as rounded to dtype
    if form == "epilogue":  # the pre-activation z = y + b as add_bias rounds it
        h = np.asarray(jnp.asarray(np.asarray(y, np.float32) + np.asarray(b.astype(dtype), np.float32), dtype),
                       np.float64)
    t = np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))
    dh = np.asarray(g, np.float64) * (0.5 * (1 + t) + 0.5 * h * (1 - t**2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * h**2))
    fn = lambda y, b: bias_gelu(y, b, form)  # noqa: E731
    out, vjp = jax.vjp(fn, y, b)
    dy, db = vjp(g)
    assert out.dtype == dy.dtype == dtype and db.dtype == jnp.float32
    # float32: a few ulps (the tanh form: XLA's float32 tanh, good to ~3e-6, times |g| <= 4);
    # bf16: the output's one rounding (2^-8 relative), nothing accumulated
    # (the epilogue form off a GPU: jax.nn.gelu's formula in bf16, which XLA:CPU rounds at some of
    # its steps: within one bf16 ulp, 2^-7 relative)
    tol = (2e-6 if form == "sigmoid" else 1.5e-5) if dtype == jnp.float32 else 2 ** (-7 if form == "epilogue" else -8)
    np.testing.assert_allclose(np.asarray(out, np.float64), 0.5 * h * (1 + t), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dy, np.float64), dh, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(db, np.float64), np.asarray(dy, np.float64).sum(0), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(db, np.float64), dh.sum(0), rtol=1e-5 if dtype == jnp.float32 else 3e-2,
                               atol=1e-4 if dtype == jnp.float32 else 0.3)
    capsys.readouterr()
    print_saved_residuals(lambda y, b: jnp.sum(fn(y, b)), y, b)
    saved = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    if form == "epilogue":  # z = y + b, and (bf16) add_bias's bias, for its gradient's dtype
        big = [line for line in saved if "[512,6]" in line]
        assert len(big) == 1 and "output of" in big[0], saved
        assert all("from the argument" in line for line in saved if line not in big), saved
    else:
        assert len(saved) == 2 and all("from the argument" in line for line in saved), saved
    x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    layer = lambda form: LoRADense(8, 2, gelu=form)  # noqa: E731
    params = jax.tree.map(lambda p: p + 0.1, layer("tanh").init(jax.random.key(1), x))
    loss = lambda p, form: jnp.sum(jnp.sin(layer(form).apply(p, x)))  # noqa: E731
    np.testing.assert_allclose(loss(params, form), loss(params, "tanh"), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(jax.grad(loss)(params, form)), jax.tree.leaves(jax.grad(loss)(params, "tanh"))):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    no_bias = LoRADense(8, use_bias=False, gelu=form)
    p = no_bias.init(jax.random.key(2), x)
    np.testing.assert_allclose(no_bias.apply(p, x), jax.nn.gelu(x @ p["params"]["kernel"], approximate=True),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="GELU form must be one of tanh, sigmoid, epilogue; got 'erf'"):
        bias_gelu(y, b, "erf")


class _Projections(nn.Module):
    """Query / key / value projections (8, 4, 4 features) of one input: "separate" (each layer on
    its own), "fused" (fused_dense) or "split" (fused_dense(split_grad=True))."""

    mode: str
    rank: int = 0
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        from zoo.nn.transformer import LoRADense, fused_dense

        ls = [LoRADense(f, self.rank, dtype=self.dtype, name=n) for f, n in ((8, "query"), (4, "key"), (4, "value"))]
        if self.mode == "separate":
            return [layer(x) for layer in ls]
        return fused_dense(x, ls, split_grad=self.mode == "split")


@pytest.mark.parametrize("rank", [0, 2])
def test_self_attention_projections_as_one_matmul(rank):
    """Attention's query / key / value projections of one input run as one matmul (fused_dense)
    on the layers' own params (same names, same init): its outputs and gradients equal the three
    layers applied one by one, LoRA adapters included, and a self-attention block's jaxpr holds
    one dot for them (the output projection and the attention's own dots aside)."""
    from tests.jaxprs import equations
    from zoo.nn.transformer import Attention, LoRADense, fused_dense

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)

    Three = lambda fused: _Projections("fused" if fused else "separate", rank)  # noqa: E731

    params = Three(True).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, Three(False).init(jax.random.key(0), x))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    loss = lambda p, fused: sum(jnp.sum(o * (i + 1)) for i, o in enumerate(Three(fused).apply(p, x)))  # noqa: E731
    for got, want in zip(Three(True).apply(params, x), Three(False).apply(params, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.tree.leaves(jax.grad(loss)(params, True)), jax.tree.leaves(jax.grad(loss)(params, False))):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gelu"):
        fused_dense(x, [LoRADense(8, gelu="tanh"), LoRADense(8)])
    with pytest.raises(ValueError, match="qkv"):
        Attention(num_heads=2, num_kv_heads=1, head_dim=4, qkv="fused3").init(jax.random.key(0), x)
    attn = Attention(num_heads=2, num_kv_heads=1, head_dim=4, lora_rank=rank, implementation="reference")
    p = attn.init(jax.random.key(0), x)
    dots = [e for e in equations(jax.make_jaxpr(lambda x: attn.apply(p, x)[0])(x)) if e.primitive.name == "dot_general"]
    assert len(dots) == 4 + (2 * 3 + 2 if rank else 0)  # qkv, out, two in "reference"; LoRA's two per layer


@pytest.mark.parametrize("rank", [0, 2])
def test_fused_projections_split_grad_equal_plain_and_never_concatenate_the_gradients(rank):
    """fused_dense(split_grad=True): the forward's one matmul, a backward per projection. Outputs
    and gradients (x's, kernels', biases', LoRA's) equal the three layers applied one by one, and
    the gradient's jaxpr concatenates no [..., 16] array (the plain fused backward does: the
    three outputs' gradients side by side)."""
    from tests.jaxprs import equations

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    Three = lambda mode: _Projections(mode, rank)  # noqa: E731

    params = Three("split").init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    loss = lambda p, x, mode: sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(Three(mode).apply(p, x)))  # noqa: E731
    for got, want in zip(Three("split").apply(params, x), Three("separate").apply(params, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got = jax.grad(loss, argnums=(0, 1))(params, x, "split")
    want = jax.grad(loss, argnums=(0, 1))(params, x, "separate")
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)

    def concatenated_widths(mode):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=1), static_argnums=2)(params, x, mode)
        return [e.outvars[0].aval.shape for e in equations(jaxpr) if e.primitive.name == "concatenate"]

    assert (2, 5, 16) in concatenated_widths("fused")  # the plain backward's copy of the three gradients
    assert all(shape[-1] != 16 or len(shape) == 2 for shape in concatenated_widths("split"))


def test_gpt_qkv_modes_and_gelu_forms_give_one_model():
    """GPTConfig.qkv: "fused", "fused-split-grad" and "separate", GPTConfig.gelu: "tanh",
    "sigmoid" and "epilogue", GPTConfig.layer_norm and GPTConfig.logsumexp: "xla" and "pallas",
    GPTConfig.xent: "logits" and "fused" (with each logsumexp, float32 logits and not, and with a
    soft prompt) are one model (same params, same loss and gradients); an unknown mode or form is
    a ConfigError naming the valid ones."""
    import dataclasses

    from zoo.errors import ConfigError
    from zoo.models.gpt import GPTConfig, make_gpt

    cfg = GPTConfig(vocab_size=32, max_len=8, num_layers=2, hidden=16, num_heads=2)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 32, (2, 9)), jnp.int32)
    batch = {"x": tokens, "idx": jnp.arange(2, dtype=jnp.int32)}
    results = {}
    variants = {"fused": {}, "fused-split-grad": dict(qkv="fused-split-grad"), "separate": dict(qkv="separate"),
                "gelu-sigmoid": dict(gelu="sigmoid"), "gelu-epilogue": dict(gelu="epilogue"),
                "ln-pallas": dict(layer_norm="pallas"), "lse-pallas": dict(logsumexp="pallas"),
                "xent-fused": dict(xent="fused"), "xent-fused-lse-pallas": dict(xent="fused", logsumexp="pallas"),
                "gelu-grad-pallas": dict(gelu="epilogue", gelu_grad="pallas")}
    for mode, changes in variants.items():
        md = make_gpt(dataclasses.replace(cfg, **changes))
        params = md.init(jax.random.key(0), batch) if not results else results["fused"][0]
        loss, grads = jax.jit(jax.value_and_grad(lambda p, md=md: md.loss(p, jax.random.key(1), batch)[0]))(params)
        results[mode] = (params, loss, grads)
    for mode in ("fused-split-grad", "separate", "gelu-sigmoid", "gelu-epilogue", "ln-pallas", "lse-pallas",
                 "xent-fused", "xent-fused-lse-pallas", "gelu-grad-pallas"):
        np.testing.assert_allclose(results[mode][1], results["fused"][1], rtol=1e-6)
        for g, r in zip(jax.tree.leaves(results[mode][2]), jax.tree.leaves(results["fused"][2])):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="model.qkv.*fused-split-grad"):
        GPTConfig(qkv="fused3")
    with pytest.raises(ConfigError, match="model.gelu .erf.; valid: epilogue, sigmoid, tanh"):
        GPTConfig(gelu="erf")
    with pytest.raises(ConfigError, match="model.layer_norm .triton.; valid: auto, pallas, xla"):
        GPTConfig(layer_norm="triton")
    with pytest.raises(ConfigError, match="model.logsumexp .triton.; valid: auto, pallas, xla"):
        GPTConfig(logsumexp="triton")
    with pytest.raises(ConfigError, match="model.xent .cut.; valid: fused, logits"):
        GPTConfig(xent="cut")
    with pytest.raises(ConfigError, match="model.gelu_grad .cublas.; valid: cublaslt, pallas, xla"):
        GPTConfig(gelu_grad="cublas")
    with pytest.raises(ConfigError, match="model.gelu_grad=pallas needs model.gelu=epilogue and no LoRA"):
        GPTConfig(gelu_grad="pallas")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlp_with_the_gelu_backward_in_the_matmul_is_the_same_mlp(dtype):
    """MLP(gelu="epilogue", gelu_grad="pallas"): the GELU and proj as gelu_proj, its backward's
    GELU derivative inside the matmul (zoo.ops.matmul_gelu's kernel, interpreted here; rows that
    no tile of 16 or more divides go to XLA's form): the same params, outputs and gradients as the
    plain MLP (bf16: to its rounding), with proj's bias apart too; a LoRA MLP or another GELU
    form is a clear error."""
    from zoo.nn.transformer import MLP

    rng = np.random.default_rng(9)
    for rows in ((2, 16), (3, 5)):  # 32 rows: the kernel; 15: XLA's form
        x = jnp.asarray(rng.standard_normal((*rows, 32)), dtype)
        plain = MLP(128, gelu="epilogue", dtype=dtype)
        params = plain.init(jax.random.key(0), x)
        params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
        for apart in (False, True):
            fused = MLP(128, gelu="epilogue", dtype=dtype, gelu_grad="pallas", bias_apart=apart)
            assert jax.tree.structure(fused.init(jax.random.key(0), x)) == jax.tree.structure(params)

            def f(m, p, x, apart=apart):
                out = m.apply(p, x)
                out = out[0] + out[1].astype(out[0].dtype) if apart else out
                return jnp.sum(jnp.sin(out.astype(jnp.float32)))
            want, want_g = jax.value_and_grad(lambda p, x: f(plain, p, x, False), (0, 1))(params, x)
            got, got_g = jax.value_and_grad(lambda p, x: f(fused, p, x), (0, 1))(params, x)
            tol = 1e-5 if dtype == jnp.float32 else 3e-2
            np.testing.assert_allclose(float(got), float(want), rtol=tol)
            for a, c in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
                assert a.dtype == c.dtype
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="MLP.gelu_grad='pallas' needs gelu='epilogue' and no LoRA; got gelu='tanh'"):
        MLP(128, gelu_grad="pallas").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="got gelu='epilogue', lora_rank=4"):
        MLP(128, lora_rank=4, gelu="epilogue", gelu_grad="pallas").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="MLP.gelu_grad must be one of xla, pallas, cublaslt; got 'cublas'"):
        MLP(128, gelu_grad="cublas").init(jax.random.key(0), x)


def test_gpt_fused_output_loss_in_bf16_and_with_a_soft_prompt():
    """GPTConfig.xent="fused" (the output layer inside the loss) in a bf16 model, with bf16 and
    with float32 logits, and when fine-tuning a soft prompt: the same loss and gradients as the
    logits form (bf16: to its rounding), the Pallas kernel interpreted here."""
    import dataclasses

    from zoo.models.gpt import GPTConfig, make_gpt

    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 32, (2, 9)), jnp.int32)
    batch = {"x": tokens, "idx": jnp.arange(2, dtype=jnp.int32)}
    base = GPTConfig(vocab_size=32, max_len=8, num_layers=1, hidden=16, num_heads=2)
    pretrained = make_gpt(base).init(jax.random.key(0), batch)
    cases = [(dict(dtype="bfloat16", f32_logits=f32), None, 2e-2) for f32 in (True, False)]
    cases.append((dict(finetune="prompt", prompt_len=3), pretrained, 1e-5))
    for changes, pre, tol in cases:
        results = []
        for xent in ("logits", "fused"):
            md = make_gpt(dataclasses.replace(base, xent=xent, logsumexp="pallas", **changes), pretrained=pre)
            params = md.init(jax.random.key(2), batch) if not results else results[0][0]
            loss, grads = jax.jit(jax.value_and_grad(lambda p, md=md: md.loss(p, jax.random.key(1), batch)[0]))(params)
            results.append((params, loss, grads))
        np.testing.assert_allclose(results[1][1], results[0][1], rtol=tol)
        for g, r in zip(jax.tree.leaves(results[1][2]), jax.tree.leaves(results[0][2])):
            assert g.dtype == r.dtype
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol * 1e-2)


def test_stack_with_residual_adds_in_the_layer_norms_under_dropout():
    """With dropout in training, the Pallas layer norm's stack (its default on an NVIDIA GPU
    since GPTConfig.layer_norm "auto") still adds each dropped-out branch inside the next layer
    norm, biases inside the branches: the same outputs and gradients as the plain stack for the
    same dropout rng, and dropout does act (not the deterministic output)."""
    from zoo.nn.transformer import Stack

    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 6, 16)), jnp.float32)
    stack = lambda ln: Stack(2, 4, 4, causal=True, dropout=0.3, layer_norm=ln)  # noqa: E731
    params = stack("xla").init(jax.random.key(0), x)
    rngs = {"dropout": jax.random.key(3)}
    run = {ln: jax.jit(jax.value_and_grad(lambda p, ln=ln: jnp.sum(jnp.sin(
        stack(ln).apply(p, x, deterministic=False, rngs=rngs)[0])))) for ln in ("xla", "pallas")}
    (want, want_grads), (got, got_grads) = run["xla"](params), run["pallas"](params)
    # a sum of 192 sines of O(1) outputs: float32 rounding is ~1e-6 absolute (JAX 0.12 fuses the
    # two forms differently), skipping dropout moves it by > 1e-3 (the last line)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    plain = jnp.sum(jnp.sin(stack("xla").apply(params, x)[0]))
    assert abs(float(plain) - float(want)) > 1e-3


def test_gpt_finetuning_with_the_pallas_layer_norm_is_the_same_model():
    """LoRA and soft-prompt fine-tuning with GPTConfig.layer_norm "pallas" (what "auto" runs on
    an NVIDIA GPU; interpreted here): the same loss and gradients as the plain layer norm's."""
    import dataclasses

    from zoo.models.gpt import GPTConfig, make_gpt

    base = GPTConfig(vocab_size=32, max_len=16, num_layers=1, hidden=16, num_heads=2)
    batch = {"x": jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 9)), jnp.int32),
             "idx": jnp.arange(2, dtype=jnp.int32)}
    pretrained = make_gpt(base).init(jax.random.key(0), batch)
    for finetune in ("lora", "prompt"):
        results = []
        for ln in ("xla", "pallas"):
            md = make_gpt(dataclasses.replace(base, finetune=finetune, prompt_len=4, layer_norm=ln), pretrained)
            # every param moved off its init (LoRA's b starts at zero)
            params = results[0][0] if results else jax.tree.map(lambda p: p + 0.01, md.init(jax.random.key(2), batch))
            loss, grads = jax.jit(jax.value_and_grad(lambda p, md=md: md.loss(p, jax.random.key(1), batch)[0]))(params)
            results.append((params, loss, grads))
        np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-6)
        for a, c in zip(jax.tree.leaves(results[1][2]), jax.tree.leaves(results[0][2])):
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)


def test_stack_with_residual_adds_in_the_layer_norms_is_the_same_model():
    """Stack(layer_norm="pallas"), with fused and with separate q/k/v projections: each residual
    add done inside the next layer norm (AddLayerNorm, the Pallas kernels interpreted here),
    cross-attention blocks included: the same params (names and shapes) as the plain Stack, the
    same outputs and gradients; an unknown layer norm, or copies of x for fused projections, is
    a clear error."""
    from zoo.nn.transformer import Stack

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    memory = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    stack = lambda ln, qkv="fused": Stack(2, 4, 4, causal=True, cross_attention=True, layer_norm=ln, qkv=qkv)  # noqa: E731
    params = stack("xla").init(jax.random.key(0), x, memory=memory)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    assert jax.tree.structure(stack("pallas").init(jax.random.key(0), x, memory=memory)) == jax.tree.structure(params)
    value_and_grad = {(ln, qkv): jax.jit(jax.value_and_grad(lambda p, ln=ln, qkv=qkv: jnp.sum(jnp.sin(
        stack(ln, qkv).apply(p, x, memory=memory)[0])))) for ln in ("xla", "pallas") for qkv in ("fused", "separate")}
    want, want_grads = value_and_grad["xla", "fused"](params)
    # "separate" with "pallas": ln_1 hands its output to the three projections as three copies
    for run in (("pallas", "fused"), ("pallas", "separate")):
        got, got_grads = value_and_grad[run](params)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for a, c in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="Block.layer_norm must be one of xla, pallas, auto; got 'apex'"):
        stack("apex").init(jax.random.key(0), x, memory=memory)
    from zoo.nn.transformer import Attention

    with pytest.raises(ValueError, match="a tuple x .one per projection. needs qkv='separate', self-attention and "
                                         "three arrays; got qkv='fused', 3 arrays"):
        Attention(4, 4, 4).init(jax.random.key(0), (x, x, x))


class _Biased(nn.Module):
    """One bf16-able layer with a bias: a LoRADense ("dense"), the same with GELU ("gelu"; its
    sigmoid formula: "gelu-sigmoid"; its epilogue form: "gelu-epilogue"), or q/k/v projections of one input in a GPTConfig.qkv mode
    ("fused", "split", "separate")."""

    kind: str
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        from zoo.nn.transformer import LoRADense

        if self.kind in ("dense", "gelu", "gelu-sigmoid", "gelu-epilogue"):
            form = {"dense": "", "gelu": "tanh", "gelu-sigmoid": "sigmoid", "gelu-epilogue": "epilogue"}[self.kind]
            return [LoRADense(48, dtype=self.dtype, gelu=form)(x)]
        return _Projections(self.kind, dtype=self.dtype)(x)


@pytest.mark.parametrize("kind", ["dense", "gelu", "gelu-sigmoid", "gelu-epilogue", "fused", "split", "separate"])
def test_bf16_layers_sum_bias_gradients_in_float32(kind):
    """A bf16 layer's bias gradient is a sum over every token (4096 here): summed in bf16 it is
    off by ~2% (measured, 2026-11-27: 1.7e-2 to 2.1e-2); the layers add their float32 bias in
    float32 (and compute GELU in float32, as PyTorch's autocast kernels do), so the sum is
    float32's and the gradient within bf16's input rounding of the float32 layer's (< 6e-3)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 1024, 32)), jnp.float32)
    params = _Biased(kind).init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.3, params)
    g = [jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in _Biased(kind).apply(params, x)]

    def bias_grads(dtype):
        loss = lambda p: sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(_Biased(kind, dtype).apply(p, x), g))  # noqa: E731
        grads = jax.grad(loss)(params)
        return [v for path, v in jax.tree_util.tree_leaves_with_path(grads) if "bias" in jax.tree_util.keystr(path)]

    got, want = bias_grads(jnp.bfloat16), bias_grads(jnp.float32)
    assert got and all(v.dtype == jnp.float32 for v in got)
    for a, b in zip(got, want):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 6e-3
