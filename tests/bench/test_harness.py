"""zoo.bench.interleaved_times: the interleaving and the warm-call rule, counted by call."""

import time

from zoo.bench import interleaved_times


def test_interleaved_times_warms_only_short_calls_after_the_first_round():
    order = []

    def make(name, seconds):
        def fn():
            order.append(name)
            time.sleep(seconds)
        return fn

    # wide margins: the threshold is wall-clock, and a loaded 2-core machine can stall a call ~10 ms
    fns = {"short": make("short", 0.0), "long": make("long", 0.06)}
    times = interleaved_times(fns, 3, warm_below_s=0.03)
    assert {k: len(v) for k, v in times.items()} == {"short": 3, "long": 3}
    # round 1: one call each; rounds 2-3: "short" gets an untimed call before its timed one; the
    # order rotates by one implementation per round
    assert order == ["short", "long", "long", "short", "short", "short", "short", "long"]
    assert min(times["long"]) >= 0.06 and max(times["short"]) < 0.06

    order.clear()
    interleaved_times(fns, 2)  # warm_below_s = 0: no extra calls
    assert order == ["short", "long", "long", "short"]

    order.clear()  # three implementations: each starts one round
    interleaved_times({k: make(k, 0.0) for k in "abc"}, 3)
    assert order == list("abc" "bca" "cab")


def test_interleaved_times_shuffled_order_varies_each_implementations_predecessor():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abcd"}
    interleaved_times(fns, 12, order="shuffle")
    rounds = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # each implementation once per round
    predecessors = {k: {r[r.index(k) - 1] for r in rounds if r.index(k) > 0} for k in "abcd"}
    assert all(len(p) >= 2 for p in predecessors.values()), predecessors  # rotation gives one each
    first = list(order)
    order.clear()
    interleaved_times(fns, 12, order="shuffle")
    assert order == first  # seeded: a rerun times in the same order
    import pytest
    with pytest.raises(ValueError, match="order"):
        interleaved_times(fns, 1, order="random")


def test_paired_speedup_cancels_a_drift_that_a_ratio_of_medians_keeps():
    from zoo.bench import paired_speedup

    # the machine slows 3x after two rounds; ours is 2x the peer's speed in every round
    ours, peer = [1.0, 1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 6.0, 6.0, 6.0]
    assert paired_speedup(ours, peer) == 2.0
    # a drift between the two calls of a round is what it cannot cancel: the median keeps one
    # round's outlier out (2.0, not the mean 2.4)
    assert paired_speedup([1.0, 1.0, 1.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0]) == 2.0


def test_run_benchmark_keeps_a_cut_runs_finished_rows(tmp_path, monkeypatch):
    """run_benchmark(out=...): each emitted row goes to OUT.partial.jsonl as it is measured (the
    header first), so a run that dies keeps its finished rows as data; a run that completes
    writes OUT whole and removes the partial file."""
    import json
    import sys
    import types

    import pytest

    import zoo.bench as bench

    fake = types.ModuleType("zoo_fake_bench")
    row = {"case": "c1", "impl": "zoo", "value": 2.0, "unit": "x/s"}

    def run(quick):
        bench.emit([row])
        if fake.fail:
            raise RuntimeError("cut off")
        return [row, *bench.emit([{**row, "case": "c2"}])]

    fake.run, fake.fail = run, True
    monkeypatch.setitem(sys.modules, "zoo_fake_bench", fake)
    monkeypatch.setitem(bench.BENCHMARKS, "fake", "zoo_fake_bench")
    out = tmp_path / "r" / "fake.json"
    monkeypatch.setenv("ZOO_CUBLASLT_WGRAD_EPILOGUE", "bgrada")  # the environment a result ran under
    with pytest.raises(RuntimeError, match="cut off"):
        bench.run_benchmark("fake", quick=True, out=str(out))
    lines = [json.loads(x) for x in (tmp_path / "r" / "fake.json.partial.jsonl").read_text().splitlines()]
    assert lines[0]["benchmark"] == "fake" and lines[0]["quick"] is True and lines[1:] == [row]
    assert lines[0]["env"]["ZOO_CUBLASLT_WGRAD_EPILOGUE"] == "bgrada"
    assert not out.exists()
    bench.emit([row])  # outside run_benchmark: printed only
    assert len((tmp_path / "r" / "fake.json.partial.jsonl").read_text().splitlines()) == 2
    fake.fail = False
    result = bench.run_benchmark("fake", quick=True, out=str(out))
    assert json.loads(out.read_text())["rows"] == result["rows"] == [row, {**row, "case": "c2"}]
    assert not (tmp_path / "r" / "fake.json.partial.jsonl").exists()


def test_run_benchmark_refuses_an_unwritable_out_before_running(tmp_path, monkeypatch):
    import sys
    import types

    import pytest

    import zoo.bench as bench
    from zoo.errors import ZooError

    fake = types.ModuleType("zoo_fake_bench2")
    fake.ran = False

    def run(quick):
        fake.ran = True
        return []

    fake.run = run
    monkeypatch.setitem(sys.modules, "zoo_fake_bench2", fake)
    monkeypatch.setitem(bench.BENCHMARKS, "fake2", "zoo_fake_bench2")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ZooError, match=r"cannot write --out .*afile/x\.json"):
        bench.run_benchmark("fake2", quick=True, out=str(tmp_path / "afile" / "x.json"))
    assert not fake.ran
