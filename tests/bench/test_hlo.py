"""zoo.bench.hlo: the launches of a compiled program, their bytes and FLOPs, against sizes counted
here from the shapes; on a machine with JAX's CUDA plugin (no GPU needed) the GPU compiler's
program for the MLP's GELU, which must move each [M, F] array the fewest times."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from zoo.bench import hlo

# a GPU program's entry computation as XLA prints it (abridged from a GPT step compiled for an H200)
GPU_TEXT = """HloModule jit_step, entry_computation_layout={(bf16[4096,256]{1,0})->f32[]}

%fused_gather (param_0.1: bf16[4096,1000], param_1.2: s32[4096,1]) -> f32[4096] {
  %param_0.1 = bf16[4096,1000]{1,0} parameter(0)
  %convert.1 = f32[4096,1000]{1,0} convert(%param_0.1)
  %param_1.2 = s32[4096,1]{1,0} parameter(1)
  %gather.1 = f32[4096,1]{1,0} gather(%convert.1, %param_1.2), offset_dims={1}, slice_sizes={1,1}
  ROOT %bitcast.1 = f32[4096]{0} bitcast(%gather.1)
}

%fused_add (param_0.2: bf16[4096,1000], param_1.3: f32[1000]) -> (bf16[4096,1000], f32[64,1000]) {
  %param_0.2 = bf16[4096,1000]{1,0} parameter(0)
  %param_1.3 = f32[1000]{0} parameter(1)
  ROOT %t = (bf16[4096,1000]{1,0}, f32[64,1000]{1,0}) tuple(%param_0.2, %param_1.3)
}

ENTRY %main.9 (x.1: bf16[4096,256], w.1: bf16[256,1000], b.1: f32[1000], i.1: s32[4096,1]) -> f32[] {
  %x.1 = bf16[4096,256]{1,0} parameter(0), metadata={op_name="x"}
  %w.1 = bf16[256,1000]{1,0} parameter(1), metadata={op_name="w"}
  %b.1 = f32[1000]{0} parameter(2)
  %i.1 = s32[4096,1]{1,0} parameter(3)
  %custom-call.7 = (bf16[4096,1000]{1,0}, s8[4194304]{0}) custom-call(%x.1, %w.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(GPT)/stack/block_3/mlp/fc/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}, frontend_attributes={_xla_stream="1"}
  %get-tuple-element.1 = bf16[4096,1000]{1,0} get-tuple-element(%custom-call.7), index=0
  %cublas-lt-matmul.3 = (bf16[4096,1000]{1,0}, bf16[4096,1000]{1,0}, s8[4194304]{0}) custom-call(%x.1, %w.1, %b.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(GPT)/stack/block_2/mlp/fc/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"BIAS_GELU_AUX"}}
  %loop_add_fusion = (bf16[4096,1000]{1,0}, f32[64,1000]{1,0}) fusion(%get-tuple-element.1, %b.1), kind=kInput, calls=%fused_add, metadata={op_name="jit(step)/transpose(jvp(GPT))/stack/block_11/mlp/fc/add"}
  %gte.2 = bf16[4096,1000]{1,0} get-tuple-element(%loop_add_fusion), index=0
  %gather_fusion = f32[4096]{0} fusion(%gte.2, %i.1), kind=kLoop, calls=%fused_gather, metadata={op_name="jit(step)/jvp()/take_along_axis"}
  %attn = (bf16[8,128,4,64]{3,2,1,0}, f32[8,4,128]{2,1,0}, u8[0]{0}) custom-call(%x.1, %x.1, %x.1), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(GPT)/stack/block_0/attn/dot_product_attention"}
  ROOT %r = f32[] constant(0)
}
"""


def test_launches_of_a_gpu_program_counted_from_its_shapes():
    ls = {x.name: x for x in hlo.launches(GPU_TEXT)}
    # views (get-tuple-element) and constants launch nothing
    assert list(ls) == ["custom-call.7", "cublas-lt-matmul.3", "loop_add_fusion", "gather_fusion", "attn"]
    gemm = ls["custom-call.7"]
    assert gemm.kind == "gemm" and gemm.flops == 2 * 4096 * 1000 * 256
    assert (gemm.read, gemm.written, gemm.aux) == (4096 * 256 * 2 + 256 * 1000 * 2, 4096 * 1000 * 2, 0)  # not the workspace
    assert (gemm.pass_, gemm.source) == ("forward", "stack/block_*/mlp/fc")
    # a GELU_AUX epilogue's matmul also writes its pre-activation out: written, and counted as aux
    gelu = ls["cublas-lt-matmul.3"]
    assert gelu.kind == "gemm" and gelu.flops == 2 * 4096 * 1000 * 256
    assert (gelu.read, gelu.written, gelu.aux) == (4096 * 256 * 2 + 256 * 1000 * 2 + 1000 * 4, 2 * 4096 * 1000 * 2,
                                                   4096 * 1000 * 2)
    add = ls["loop_add_fusion"]
    assert add.kind == "fusion:kInput" and (add.pass_, add.source) == ("backward", "stack/block_*/mlp/fc")
    assert (add.read, add.written) == (4096 * 1000 * 2 + 1000 * 4, 4096 * 1000 * 2 + 64 * 1000 * 4)
    # the fusion only gathers its [4096, 1000] operand (through a convert): one f32 per row read
    assert ls["gather_fusion"].read == 4096 * 4 + 4096 * 4 and ls["gather_fusion"].written == 4096 * 4
    attn = ls["attn"]
    assert attn.kind == "attention" and attn.written == 8 * 128 * 4 * 64 * 2 + 8 * 4 * 128 * 4
    by_kind = {r["kind"]: r for r in hlo.traffic(list(ls.values()))}
    assert by_kind["gemm"]["tflop"] == pytest.approx(2 * 2 * 4096 * 1000 * 256 / 1e12)
    assert sum(r["gb"] for r in by_kind.values()) == pytest.approx(sum(x.bytes for x in ls.values()) / 1e9)
    by_source = hlo.traffic(list(ls.values()), by="source")
    assert {r["source"] for r in by_source} == {"for stack/block_*/mlp/fc", "bac stack/block_*/mlp/fc",
                                                "for take_along_axis", "for stack/block_*/attn"}


def test_launches_of_this_machines_compiled_program():
    """A program compiled here (the CPU's XLA prints the same text format): one fusion reading two
    [64, 32] float32 arrays and writing one."""
    text = jax.jit(lambda x, y: x * y + 1.0).lower(jnp.ones((64, 32)), jnp.ones((64, 32))).compile().as_text()
    (fusion,) = hlo.launches(text)
    assert fusion.kind.startswith("fusion:") and (fusion.read, fusion.written) == (2 * 64 * 32 * 4, 64 * 32 * 4)
    with pytest.raises(ValueError, match="no ENTRY computation"):
        hlo.launches("HloModule nothing")


def test_unknown_gpu_target_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown GPU target 'v100'; known: h100, h200"):
        hlo.compile_for_gpu(lambda x: x, jnp.ones(3), target="v100")


CUDA_PLUGIN = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13)) \
    if importlib.util.find_spec("jax_plugins") else False


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
@pytest.mark.parametrize("form", ["tanh", "sigmoid"])
def test_gelu_moves_each_array_once_each_way_on_a_gpu(form):
    """The MLP's bias + GELU in a bf16 train step as XLA compiles it for an H200: the forward reads
    y (the fc matmul's output) and writes h; the backward reads y and h's gradient and writes y's
    (the bias gradient summed in the same pass), 5 [M, F] bf16 arrays in all. The backward
    recomputes the GELU from y; without the optimization barrier on its residuals XLA merged the
    two tanh computations, so the forward wrote tanh(...) out in float32 for the backward to read
    (9 arrays' worth for the tanh form)."""
    from zoo.ops.gelu import bias_gelu

    M, K, F = 8192, 256, 1024

    def loss(x, w1, b1, w2):
        h = bias_gelu(x @ w1.astype(x.dtype), b1, form)
        return jnp.sum((h @ w2.astype(x.dtype)).astype(jnp.float32) ** 2)

    args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((K, F), jnp.float32),
            jax.ShapeDtypeStruct((F,), jnp.float32), jax.ShapeDtypeStruct((F, K), jnp.float32))
    ls = hlo.launches(hlo.compile_for_gpu(jax.grad(loss, argnums=(0, 1, 2, 3)), *args).as_text())
    arr = M * F * 2
    big = [x for x in ls if x.kind != "gemm" and x.bytes >= arr]
    fwd = [x for x in big if x.pass_ == "forward"]
    bwd = [x for x in big if x.pass_ == "backward"]
    assert len(fwd) == 1 and fwd[0].read < 1.01 * arr and fwd[0].written < 1.01 * arr, fwd
    assert len(bwd) == 1 and bwd[0].read < 2.01 * arr and bwd[0].written < 1.1 * arr, bwd


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
def test_gelu_epilogue_runs_in_the_matmul_on_a_gpu():
    """The "epilogue" GELU form in a bf16 train step as XLA compiles it for an H200: the fc
    matmul's cuBLASLt epilogue adds the bias and applies the GELU (BIAS_GELU_AUX), writing h and
    z = y + b (its aux output, for the backward), so no forward pass over an [M, F] array is left;
    the backward is the one pass of the other forms (z and h's gradient in, z's gradient out).
    bias_gelu_tanh's forward, compiled the same way, is a pass of its own (what this form saves)."""
    from zoo.ops.gelu import bias_gelu

    M, K, F = 8192, 256, 1024

    def loss(form, x, w1, b1, w2):
        h = bias_gelu(x @ w1.astype(x.dtype), b1, form)
        return jnp.sum((h @ w2.astype(x.dtype)).astype(jnp.float32) ** 2)

    args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((K, F), jnp.float32),
            jax.ShapeDtypeStruct((F,), jnp.float32), jax.ShapeDtypeStruct((F, K), jnp.float32))
    arr = M * F * 2
    for form, epilogue, passes in (("epilogue", "BIAS_GELU_AUX", 0), ("tanh", None, 1)):
        text = hlo.compile_for_gpu(jax.grad(functools.partial(loss, form), argnums=(0, 1, 2, 3)), *args).as_text()
        ls = hlo.launches(text)
        fc = [x for x in ls if x.kind == "gemm" and x.pass_ == "forward" and x.written >= arr]
        assert len(fc) == 1 and fc[0].aux == (arr if epilogue else 0), fc
        assert (f'"epilogue":"{epilogue}"' in text) if epilogue else ("GELU" not in text)
        big = [x for x in ls if x.kind != "gemm" and x.bytes >= arr]
        assert len([x for x in big if x.pass_ == "forward"]) == passes, big
        bwd = [x for x in big if x.pass_ == "backward"]
        assert len(bwd) == 1 and bwd[0].read < 2.01 * arr and bwd[0].written < 1.1 * arr, bwd


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
def test_bf16_bias_add_folds_into_the_matmul_on_a_gpu():
    """zoo.ops.linear.add_bias on a bf16 matmul's output, as XLA compiles it for an H200: the add is
    cuBLASLt's BIAS epilogue (the matmul reads the bias; no pass over y of its own), and the bias
    gradient is one reduction reading y's gradient once, in float32."""
    from zoo.ops.linear import add_bias

    M, K, F = 8192, 256, 768

    def loss(x, w, b):
        y = add_bias(x @ w.astype(x.dtype), b)
        return jnp.sum(jnp.tanh(y).astype(jnp.float32))

    args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((K, F), jnp.float32),
            jax.ShapeDtypeStruct((F,), jnp.float32))
    text = hlo.compile_for_gpu(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args).as_text()
    assert '"epilogue":"BIAS"' in text
    ls = hlo.launches(text)
    arr = M * F * 2
    fwd = [x for x in ls if x.pass_ == "forward" and x.bytes >= arr]
    gemm = [x for x in fwd if x.kind == "gemm"]
    assert len(gemm) == 1 and gemm[0].read == M * K * 2 + K * F * 2 + F * 2  # x, w, the bf16 bias
    # the one non-matmul pass over y: tanh and its use, reading y once (no separate bias add)
    assert all(x.read < 1.01 * arr for x in fwd if x.kind != "gemm")


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
def test_gpt_step_reductions_read_no_concatenation_on_a_gpu():
    """A bf16 GPT train step (fused q/k/v projections, cuDNN attention) compiled for an H200: no
    reduction fusion concatenates its inputs itself (the q/k/v bias gradient as one reduction over
    a concatenation of the three cuDNN outputs ran at 1.66 TB/s on an H200, plain reductions at
    3.3-3.9); it reads the concatenated gradient the matmuls read."""
    import optax

    from zoo.models.gpt import GPTConfig, make_gpt
    from zoo.train.state import init_state
    from zoo.train.strategy import make_train_step

    # one GPT-124M layer at B8 (smaller ones compile without the merge)
    cfg = GPTConfig(vocab_size=256, max_len=1024, num_layers=1, hidden=768, num_heads=12, dtype="bfloat16",
                    implementation="cudnn", f32_logits=False)
    md, tx = make_gpt(cfg), optax.adamw(1e-3)
    batch = {"x": jax.ShapeDtypeStruct((8, 1025), jnp.int32), "idx": jax.ShapeDtypeStruct((8,), jnp.int32)}
    with hlo.tracing_for_gpu():
        state = jax.eval_shape(lambda k, b: init_state(md.init(k, b), tx, 0.0), jax.random.PRNGKey(0), batch)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(1))
    text = hlo.compile_for_gpu(make_train_step(md, tx, 0.0), state, key, batch).as_text()
    comps, _ = hlo.parse_computations(text)
    reducing = {name for name, body in comps.items() if any(i.op == "reduce" for i in body)}
    assert reducing and any(i.op == "concatenate" for body in comps.values() for i in body)
    assert not [name for name in reducing if any(i.op == "concatenate" for i in comps[name])]
