"""The kernel table: classes of kernel names, per-call sums, and a real trace on this backend."""

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.bench import profile


@pytest.mark.parametrize("name,cls", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("loop_convert_fusion_12", "fusion"),
    ("input_reduce_fusion", "fusion"),
    ("copy.413", "copy"),
    ("some_kernel", "other"),
])
def test_kernel_class(name, cls):
    assert profile.kernel_class(name) == cls


def test_summarize_sums_per_call_and_keeps_device_timelines():
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "XLA Ops"}},
    ]
    ev = meta + [
        {"ph": "X", "pid": 2, "tid": 7, "name": "nvjet_gemm", "dur": 300.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "nvjet_gemm", "dur": 300.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "loop_add_fusion", "dur": 200.0},
        {"ph": "X", "pid": 2, "tid": 8, "name": "dot.1", "dur": 999.0},  # summary line: not a kernel
        {"ph": "X", "pid": 1, "tid": 3, "name": "PjitFunction", "dur": 5000.0},  # host
    ]
    s = profile.summarize(profile.device_events(ev), calls=2)
    assert s["total_ms"] == pytest.approx(0.4)  # (300 + 300 + 200) us over 2 calls
    assert [r["name"] for r in s["rows"]] == ["nvjet_gemm", "loop_add_fusion"]
    assert s["rows"][0]["ms"] == pytest.approx(0.3) and s["rows"][0]["count"] == 1
    assert s["classes"] == pytest.approx({"gemm": 0.75, "fusion": 0.25})
    # with the bytes per launch from the compiled program: the fusion's rate, one launch of 1e8 B
    # in 200 us
    s = profile.summarize(profile.device_events(ev), calls=2, kernel_bytes={"loop_add_fusion": 100_000_000})
    assert s["rows"][1]["tbps"] == pytest.approx(0.5) and "tbps" not in s["rows"][0]


def test_kernel_bytes_names_kernels_as_the_trace_does():
    """An op `loop_add_fusion.35` runs as kernel `loop_add_fusion_35`; matmuls and attention (their
    kernels are cuBLAS's and cuDNN's, named otherwise) are left out."""
    from tests.bench.test_hlo import GPU_TEXT

    got = profile.kernel_bytes(GPU_TEXT.replace("%loop_add_fusion ", "%loop_add_fusion.35 "))
    assert got == {"loop_add_fusion_35": 4096 * 1000 * 2 * 2 + 1000 * 4 + 64 * 1000 * 4,
                   "gather_fusion": 4096 * 4 * 3}


def test_kernel_bytes_names_a_pallas_kernel_by_its_own_name():
    """A Pallas (Triton) custom call `pallas_call.7` runs as the kernel its backend config names
    (`name = "layer_norm_fwd"`, pallas_call's name=): its bytes under both names."""
    from tests.bench.test_hlo import GPU_TEXT

    call = ('  %pallas_call.7 = (bf16[4096,256]{1,0}, f32[4096]{0}) custom-call(%x.1), '
            'custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(GPT)/stack/ln_f/pallas_call"}, '
            'backend_config={debug = false, grid_x = 1024 : i32, name = "layer_norm_fwd", num_stages = 3 : i32}\n')
    got = profile.kernel_bytes(GPU_TEXT.replace("  ROOT %r", call + "  ROOT %r"))
    moved = 4096 * 256 * 2 * 2 + 4096 * 4  # x in; y and the row statistic out
    assert got["layer_norm_fwd"] == got["pallas_call_7"] == moved


def test_idle_gaps_merge_streams_and_leave_out_the_wait_between_calls():
    k = lambda ts, dur, name: {"ph": "X", "ts": ts, "dur": dur, "name": name}
    ev = [k(0, 10, "a"), k(13, 10, "b"),  # 3 us gap
          k(20, 30, "c"),                 # another stream, overlapping b: no gap
          k(60, 5, "d"),                  # 10 us after c, the latest end
          k(200, 5, "e"),                 # 135 us
          k(5000, 10, "a"), k(5050, 10, "b")]  # a new call (4795 us: between calls), then 40 us
    g = profile.idle_gaps(ev, calls=2)
    assert g["kernels"] == 3.5
    assert g["idle_ms"] == pytest.approx((3 + 10 + 135 + 40) / 1e3 / 2)
    assert g["bins"] == pytest.approx({"<5us": 0.0015, "5-20us": 0.005, "20-100us": 0.02, ">=100us": 0.0675})
    assert [(x["us"], x["after"], x["before"]) for x in g["largest"][:2]] == [(135, "d", "e"), (40, "a", "b")]
    assert g["long"] == [{"us": 4795, "after": "e", "before": "a"}]
    assert g["span_ms"] == pytest.approx(5060 / 1e3 / 2)  # 0 to b's end at 5060 us


def test_memsets_by_size_from_the_trace_arguments():
    k = lambda name, dur, **args: {"ph": "X", "ts": 0, "dur": dur, "name": name, "args": args}
    ev = [k("Memset 3", 6.0, Memset_details="num_bytes:16777216 kind:DEVICE", stream="7"),
          k("Memset 3", 1.0, Memset_details="num_bytes:4096 kind:DEVICE"),
          k("cudnn_flash_fprop", 50.0, kernel_details="regs:168"),
          k("Memset 3", 6.0, Memset_details="num_bytes:16777216 kind:DEVICE"),
          k("Memset 3", 1.0, Memset_details="num_bytes:4096 kind:DEVICE"),
          k("cudnn_flash_fprop", 50.0)]
    m = profile.memsets(ev, calls=2)
    assert m["count"] == 2 and m["ms"] == pytest.approx(0.007)  # (6 + 1) us per call
    assert list(m["sizes"].items()) == [(16777216, 1), (4096, 1)]  # largest first, per call
    assert m["args"] == ["Memset_details", "stream"]
    bare = profile.memsets([k("Memset 0", 2.0), k("memset_kernel", 2.0, other="x")], calls=1)
    assert bare["sizes"] == {None: 2} and bare["args"] == []
    assert profile.memsets([k("gemm", 1.0)], calls=1) == {"count": 0, "ms": 0, "sizes": {}, "args": []}


def test_kernel_table_on_this_backend(capsys):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)), jnp.float32)
    f = jax.jit(lambda a: jnp.tanh(a @ a))
    f(a).block_until_ready()
    s = profile.kernel_table(lambda: f(a).block_until_ready(), calls=2, title="tanh(a @ a)")
    assert s["total_ms"] > 0 and s["rows"]
    assert abs(sum(s["classes"].values()) - 1.0) < 1e-9
    out = capsys.readouterr().out
    assert "kernel time per call of tanh(a @ a)" in out and "idle between kernels per call" in out
    assert s["gaps"]["kernels"] >= 1 and s["gaps"]["idle_ms"] >= 0


def test_report_is_off_by_default_and_never_raises(monkeypatch, capsys):
    monkeypatch.delenv("ZOO_PROFILE", raising=False)
    assert profile.report(lambda: None) is None
    monkeypatch.setenv("ZOO_PROFILE", "1")

    def broken():
        raise RuntimeError("no CUPTI")

    assert profile.report(broken) is None
    assert "kernel table skipped: RuntimeError: no CUPTI" in capsys.readouterr().out


def test_report_writes_the_compiled_program(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ZOO_PROFILE", "1")
    monkeypatch.setenv("ZOO_PROFILE_DIR", str(tmp_path))
    a = jnp.ones((64, 64), jnp.float32)
    f = jax.jit(lambda a: jnp.tanh(a @ a))
    f(a).block_until_ready()
    s = profile.report(lambda: f(a).block_until_ready(), calls=1, name="tanh matmul",
                       hlo=lambda: f.lower(a).compile().as_text())
    assert s is not None and s["total_ms"] > 0
    text = gzip.decompress((tmp_path / "tanh_matmul.hlo.txt.gz").read_bytes()).decode()
    assert "HloModule" in text and "tanh" in text
    assert "bytes per kernel skipped" not in capsys.readouterr().out
