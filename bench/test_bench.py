"""pytest-benchmark cases: small problems, stfast next to the SDPA code it replaces.

Every implementation is first checked against the float64 oracle (the same guard as
``python -m bench``); a wrong result fails the test instead of being timed.  CPU
cases compare the ``torch`` backend with hand-written SDPA; the kernel backends and
FlexAttention are benchmarked on a GPU (marker ``gpu``).  Run with
``pytest bench/ --benchmark-only``.
"""

import pytest
import torch

from bench.competitors import competitors
from bench.measure import TOLERANCE, Reference, make_step
from bench.shapes import Case, Inputs

CASES = {
    "dense": Case("causal", "dense", "dense", dict(B=1, H=4, L=256, D=64)),
    "causal": Case("causal", "causal", "causal", dict(B=1, H=4, L=256, D=64)),
    "space": Case("spatiotemporal", "space", "space", dict(B=1, T=8, N=64, H=4, D=32)),
    "time": Case("spatiotemporal", "time", "time", dict(B=1, T=8, N=64, H=4, D=32)),
    "block_sparse": Case("block_sparse", "local", "block_sparse", dict(B=1, H=4, L=1024, D=64),
                         layout=("local", dict(seq_len=1024, window=64, block=64))),
}
BASELINE = {"dense": "sdpa", "causal": "sdpa", "space": "permute+sdpa", "time": "permute+sdpa",
            "block_sparse": "sdpa+mask"}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
PASSES = ("fwd", "fwd+bwd")
ROUNDS = {"cpu": 7, "cuda": 50}


def _params():
    for name in CASES:
        for pass_ in PASSES:
            for impl in ("stfast[torch]", BASELINE[name]):
                yield pytest.param(name, impl, pass_, id=f"{name}-{pass_}-{impl}")
            for impl in ("stfast[triton]", "stfast[cuda]", "flex"):
                if impl == "flex" and name in ("dense", "space", "time"):
                    continue
                yield pytest.param(name, impl, pass_, id=f"{name}-{pass_}-{impl}", marks=pytest.mark.gpu)


@pytest.mark.parametrize("name,impl_name,pass_", list(_params()))
def test_attention(benchmark, name, impl_name, pass_):
    case = CASES[name]
    impl = next(i for i in competitors(case, DEVICE) if i.name == impl_name)
    if impl.fn is None:
        pytest.skip(f"{impl_name}: {impl.reason}")
    inputs = Inputs(case, DTYPE, DEVICE)
    ref = Reference(case, inputs, need_grads=pass_ != "fwd")
    step, checked = make_step(impl.fn, inputs, pass_, ref.dout)
    out, grads = checked()
    err = ref.error(out, grads)
    assert err <= TOLERANCE[DTYPE], f"{impl_name} {pass_}: error {err:.3g} vs the {ref.source}"
    benchmark.group = f"{name} {pass_}"
    timed = (lambda: (step(), torch.cuda.synchronize())) if DEVICE.type == "cuda" else step
    # Fixed rounds keep the whole file within its CI budget (under a minute on 2 cores).
    benchmark.pedantic(timed, rounds=ROUNDS[DEVICE.type], warmup_rounds=1)


# The command line's own behaviour: cheap checks, no timing.

def test_progress_shows_elapsed_and_time_left_scaled_by_finished_steps(monkeypatch):
    import io

    from bench import measure

    clock = iter([0.0, 0.0, 4.0, 4.0, 6.0])  # start, then each step's perf_counter
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    progress = measure.Progress([2.0, 1.0, 3.0], stream=stream)
    progress.step("first")
    progress.step("second")  # the first took 4 s against 2 estimated: the rest is 2x its 4 s
    lines = stream.getvalue().splitlines()
    assert "0:00 elapsed" in lines[0] and "~0:06 left" in lines[0], lines[0]
    assert "0:04 elapsed" in lines[1] and "~0:08 left" in lines[1], lines[1]


def test_estimate_has_a_step_for_every_row_distributed_included():
    import argparse

    from bench import distributed
    from bench.run import estimate, plan
    from bench.shapes import select

    cases = select("cpu", ("block_sparse",))
    plans = plan(cases, torch.device("cpu"))
    steps = estimate(plans, ("fwd", "fwd+bwd"), 0.6, 1e11)
    assert len(steps) == sum(len(impls) for _, impls, _ in plans) * 2
    order = [(i, pass_) for _, impls, _ in plans for pass_ in ("fwd", "fwd+bwd") for i in impls]
    runs = [s for s, (impl, pass_) in zip(steps, order)
            if impl.fn is not None and (pass_ == "fwd" or not impl.no_backward)]
    assert runs and all(s > 0 for s in runs) and sum(steps) < 600
    args = argparse.Namespace(world_sizes=[2, 4], modes=["divided"], passes=("fwd", "fwd+bwd"), budget=0.6)
    rows_per_world = len(distributed.SHAPES) * len(distributed.STRATEGIES) * 2
    assert len(distributed.estimate(args, 1e11)) == 2 * rows_per_world


def test_load_warning_discounts_the_runs_own_threads():
    from bench.report import load_warning

    assert load_warning(0.2, None, cores=2, threads=2) is None
    assert load_warning(0.2, 2.6, cores=2, threads=2) is None  # busy with our own 2 threads
    assert "loaded" in load_warning(0.2, 4.5, cores=2, threads=2)
    assert "before the run" in load_warning(3.0, None, cores=2, threads=1)


def test_plot_layout_keeps_table_order_and_gives_each_case_only_its_bars():
    from bench.report import plot_layout

    def row(suite, case, impl, pass_="fwd"):
        return dict(suite=suite, case=case, impl=impl, status="ok", speedup=1.0, **{"pass": pass_})
    rows = [row("causal", "b", "stfast[torch]"), row("causal", "b", "sdpa"), row("causal", "b", "flex"),
            row("causal", "a", "stfast[torch]"), row("causal", "a", "sdpa"),
            row("spatiotemporal", "c", "stfast[torch]"), row("spatiotemporal", "c", "permute+sdpa"),
            row("distributed", "video divided P=2", "sp-dsp", "fwd+bwd"),
            row("distributed", "video divided P=2", "sp-ulysses", "fwd+bwd")]
    slots, ticks, headings, height = plot_layout(rows, ("fwd", "fwd+bwd"))
    assert [c for _, c in ticks] == ["b", "a", "c", "video divided P=2"]
    assert [(s, c, n) for _, s, c, n in slots] == [
        ("causal", "b", "stfast[torch]"), ("causal", "b", "flex"), ("causal", "b", "sdpa"),
        ("causal", "a", "stfast[torch]"), ("causal", "a", "sdpa"),
        ("spatiotemporal", "c", "stfast[torch]"), ("spatiotemporal", "c", "permute+sdpa"),
        ("distributed", "video divided P=2", "sp-dsp"), ("distributed", "video divided P=2", "sp-ulysses")]
    ys = [y for y, *_ in slots]
    assert ys == sorted(ys) and len(headings) == 3 and height > ys[-1]


def test_main_records_threads_and_load_in_every_report(tmp_path, monkeypatch, capsys):
    import json

    import bench.__main__ as cli

    tiny = [Case("spatiotemporal", "tiny space", "space", dict(B=1, T=2, N=16, H=2, D=8), flex=False)]
    monkeypatch.setattr(cli, "select", lambda preset, suites: tiny)
    threads = torch.get_num_threads()
    try:
        cli.main(["--suite", "spatiotemporal", "--pass", "fwd", "--threads", "1", "--budget", "0.01",
                  "--device", "cpu", "--out", str(tmp_path)])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    meta = json.loads((tmp_path / "cpu.json").read_text())["meta"]
    assert meta["threads"] == 1 and len(meta["load_average"]) == 6 and meta["estimated_s"] > 0 and meta["elapsed_s"] > 0
    markdown = (tmp_path / "cpu.md").read_text()
    for text in (captured.out, markdown):
        assert "torch threads: 1 of" in text and "load average" in text
        assert "DESIGN" not in text
    assert "expected to take about" in captured.err
