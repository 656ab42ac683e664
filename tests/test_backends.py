"""The backend registry, dispatch, the environment report and torch.compile."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import stfast
from stfast import backends
from stfast.lowering import lower


def _problem(device="cpu"):
    q = torch.randn(1, 2, 8, 4, device=device)
    return lower("dense", q, q, q, scale=0.5)


def test_available_reports_every_backend_with_a_reason_or_none():
    status = backends.available()
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"] is None
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason)
    if not torch.cuda.is_available():
        assert isinstance(status["cuda"], str)


def test_auto_on_cpu_is_torch_and_use_and_env_prefer(monkeypatch):
    p = _problem()
    assert backends.select(p).name == "torch"
    with backends.use("cuda"):  # a preference falls through when it cannot run
        assert backends.requested_name("auto") == "cuda"
        assert backends.select(p).name == "torch"
    monkeypatch.setenv("STFAST_BACKEND", "triton")
    assert backends.requested_name("auto") == "triton"
    monkeypatch.setenv("STFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="STFAST_BACKEND must be one of"):
        backends.requested_name("auto")


def test_explain_lists_reasons_per_backend():
    reasons = backends.explain(_problem())
    assert reasons["torch"] == []
    if not torch.cuda.is_available():
        assert reasons["cuda"], "the cuda backend must say why it cannot run on CPU"


def test_measured_order_reads_dispatch_table(monkeypatch, tmp_path):
    table = tmp_path / "dispatch.json"
    table.write_text(json.dumps({"cpu": {"dense": ["cuda", "torch"]}}))
    monkeypatch.setattr(backends, "_dispatch_table", backends.load_dispatch_table(table))
    assert backends._measured_order(_problem()) == ("cuda", "torch", "triton")


def test_python_m_stfast_reports_backends():
    out = subprocess.run([sys.executable, "-m", "stfast"], capture_output=True, text=True, check=True).stdout
    assert "torch " in out and "backends:" in out
    for name in ("torch", "triton", "cuda"):
        assert f"  {name}" in out


def test_import_needs_no_gpu_triton_or_nvcc():
    code = ("import sys; sys.modules['triton'] = None; import stfast; "
            "print(stfast.backends.available()['triton'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() != "None"


@pytest.mark.parametrize("mode", ["divided", "heads", "gated", "joint"])
def test_modules_compile_fullgraph(mode):
    torch._dynamo.reset()
    m = stfast.SpatioTemporalAttention(16, 4, mode=mode, causal_time=True)
    x = torch.randn(2, 3, 5, 16, requires_grad=True)
    if mode == "joint":
        m(x)  # builds the frame-causal layout for this (T, N), as the docstring asks
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_block_sparse_and_mha_compile_fullgraph():
    torch._dynamo.reset()
    layout = stfast.layouts.from_mask(torch.rand(4, 40, 40) > 0.5, block=16)
    m = stfast.BlockSparseSelfAttention(16, 4, layout)
    x = torch.randn(2, 40, 16)
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="aot_eager")(x), m(x))
    mha = stfast.MultiheadAttention(16, 4, batch_first=True)
    q = torch.randn(2, 7, 16)
    f = torch.compile(lambda t: mha(t, t, t, need_weights=False)[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q), mha(q, q, q, need_weights=False)[0])


def test_inductor_compiles_spatiotemporal_module():
    torch._dynamo.reset()
    m = stfast.SpatioTemporalAttention(16, 4, mode="divided", causal_time=True)
    x = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.interpret
def test_kernel_custom_op_passes_opcheck_and_compiles(allow_tf32):
    if backends.available()["triton"] is not None:
        pytest.skip(f"triton backend unavailable: {backends.available()['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On a GPU float32 runs as TF32 (IEEE float32 is refused there).
    allow_tf32(True)
    q, k, v = (torch.randn(1, 2, 16, 8, device=device, requires_grad=True) for _ in range(3))
    fwd = torch.ops.stfast.attention_fwd.default
    torch.library.opcheck(fwd, (q, k, v, None, [], 0, [0, 0, 0], "dense", "top_left", 0.35, "triton"))
    lay = stfast.layouts.causal(16, block=16).lowered(device, (0, 0, 0))
    torch.library.opcheck(fwd, (q, k, v, None, lay.tables(), 16, [0, 0, 0], "dense", "", 0.35, "triton"))
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: stfast.attention(a, b, c, causal=True, backend="triton"),
                      fullgraph=True, backend="aot_eager")
    out = f(q, k, v)
    tol = 1e-4 if device == "cpu" else 2e-3
    torch.testing.assert_close(out, stfast.attention(q, k, v, causal=True, backend="torch"),
                               atol=tol, rtol=tol)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


# ---- dispatch without GPU numbers, STFAST_BACKEND, explain(public arguments) ----------

class _Fake(backends.Backend):
    """A kernel backend that runs everything (stands in for triton/cuda on a GPU)."""

    def __init__(self, name):
        self.name = name


def _meta_problem(kind="dense", **kw):
    """A problem on the meta device: no memory, no CPU-only rule in the way."""
    if kind == "dense":
        q = torch.empty(2, 4, 256, 64, device="meta")
        k = torch.empty(2, kw.pop("hkv", 4), 256, 64, device="meta")
    else:
        q = k = torch.empty(2, 8, 196, 4, 64, device="meta")
    return lower(kind, q, k, k, scale=0.125, **kw)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every backend available and willing; the device is an 'NVIDIA H200' with no
    measured results unless a test adds them."""
    fakes = {"triton": _Fake("triton"), "cuda": _Fake("cuda"), "torch": backends.get("torch")}
    monkeypatch.setattr(backends, "get", lambda name: fakes[name])
    monkeypatch.setattr(backends, "_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(backends, "_dispatch_table", {})
    monkeypatch.delenv("STFAST_BACKEND", raising=False)
    return fakes


def test_auto_without_gpu_numbers_keeps_what_sdpa_runs_on_torch(fake_gpu):
    layout = stfast.layouts.local(256, window=64, block=64).lowered("meta", (0, 0, 0))
    mask = torch.empty(2, 4, 256, 256, dtype=torch.bool, device="meta")
    sdpa_native = {"dense": _meta_problem(), "causal": _meta_problem(causal="top_left"),
                   "causal bottom-right": _meta_problem(causal="bottom_right"),
                   "GQA": _meta_problem(hkv=2, causal="top_left")}
    kernels_first = {"time": _meta_problem("time", causal="top_left"), "space": _meta_problem("space"),
                     "element mask": _meta_problem(mask=mask), "block-sparse": _meta_problem(layout=layout)}
    for what, p in sdpa_native.items():
        assert backends.order(p)[0] == "torch", what
        assert backends.select(p).name == "torch", what
    for what, p in kernels_first.items():
        assert backends.order(p)[0] == "triton", what
        assert backends.select(p).name == "triton", what


def test_measured_results_override_the_rule(fake_gpu, monkeypatch):
    monkeypatch.setattr(backends, "_dispatch_table",
                        {"NVIDIA H200": {"dense": ["cuda", "torch"], "time": ["torch", "triton"]}})
    assert backends.select(_meta_problem()).name == "cuda"
    assert backends.select(_meta_problem("time", causal="top_left")).name == "torch"
    assert backends.select(_meta_problem(causal="top_left")).name == "torch"  # "causal" not measured


def test_preference_still_goes_first_without_numbers(fake_gpu, monkeypatch):
    monkeypatch.setenv("STFAST_BACKEND", "triton")
    assert backends.select(_meta_problem()).name == "triton"


@pytest.mark.parametrize("value,hint", [("TRITON", "did you mean 'triton'"), ("tpu", None), ("Auto", "'auto'")])
def test_bad_stfast_backend_fails_import_with_valid_names(value, hint):
    env = dict(os.environ, STFAST_BACKEND=value)
    proc = subprocess.run([sys.executable, "-c", "import stfast"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "STFAST_BACKEND must be one of auto, torch, triton, cuda" in proc.stderr
    assert repr(value) in proc.stderr
    if hint:
        assert hint in proc.stderr


def test_stfast_backend_accepts_exact_names_and_blank(monkeypatch):
    for value, want in (("", "auto"), (" ", "auto"), ("torch", "torch"), ("cuda", "cuda")):
        monkeypatch.setenv("STFAST_BACKEND", value)
        assert backends.requested_name("auto") == want


def test_unhonoured_preference_warns_once(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setenv("STFAST_BACKEND", "cuda")
    q = torch.randn(1, 2, 8, 4)
    with pytest.warns(RuntimeWarning, match="STFAST_BACKEND prefers 'cuda'.*using 'torch'"):
        stfast.attention(q, q, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stfast.attention(q, q, q)  # the same reason again: no second warning


def test_python_m_stfast_reports_the_setting():
    for value, expect in ((None, "STFAST_BACKEND: unset (auto)"),
                          ("cuda", "STFAST_BACKEND=cuda: prefers 'cuda', which is unavailable here")):
        env = {k: v for k, v in os.environ.items() if k != "STFAST_BACKEND"}
        if value:
            env["STFAST_BACKEND"] = value
        out = subprocess.run([sys.executable, "-m", "stfast"], capture_output=True, text=True, env=env,
                             check=True).stdout
        if value == "cuda" and torch.cuda.is_available():
            expect = "STFAST_BACKEND=cuda: prefers 'cuda'"
        assert expect in out, out


def test_explain_takes_the_public_functions_arguments():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    reasons = backends.explain(q, q, q, causal=True)
    assert set(reasons) == set(backends.BACKEND_NAMES) and reasons["torch"] == []
    x = torch.randn(1, 3, 5, 2, 8)
    assert backends.explain(x, x, x, axis="time", causal=True)["torch"] == []
    mask = torch.rand(8, 8) > 0.5
    assert backends.explain(q, q, q, attn_mask=mask)["torch"] == []
    # Validated exactly as the public function validates.
    with pytest.raises(ValueError, match="axis must be"):
        backends.explain(x, x, x, axis="depth")
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        backends.explain(q, q, q, causal=True, window=3)
    # Probing runs nothing: no output, no graph, and the next real call is unaffected.
    assert q.grad is None
    assert stfast.attention(q, q, q).shape == q.shape


def test_explain_lists_resource_reasons_of_the_triton_backend_on_a_problem_it_refuses():
    if backends.available()["triton"] is not None:
        pytest.skip("needs the triton backend (a GPU or TRITON_INTERPRET=1)")
    q = torch.randn(1, 1, 8, 300)
    assert any("head dims" in r for r in backends.explain(q, q, q)["triton"])
