"""The backend registry, dispatch, the environment report and torch.compile."""

import json
import subprocess
import sys

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
def test_kernel_custom_op_passes_opcheck_and_compiles():
    if backends.available()["triton"] is not None:
        pytest.skip(f"triton backend unavailable: {backends.available()['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(1, 2, 16, 8, device=device, requires_grad=True) for _ in range(3))
    fwd = torch.ops.stfast.attention_fwd.default
    torch.library.opcheck(fwd, (q, k, v, None, [], 0, [0, 0, 0], "dense", "top_left", 0.35, "triton"))
    lay = stfast.layouts.causal(16, block=16).lowered(device, (0, 0, 0))
    torch.library.opcheck(fwd, (q, k, v, None, lay.tables(), 16, [0, 0, 0], "dense", "", 0.35, "triton"))
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: stfast.attention(a, b, c, causal=True, backend="triton"),
                      fullgraph=True, backend="aot_eager")
    out = f(q, k, v)
    torch.testing.assert_close(out, stfast.attention(q, k, v, causal=True, backend="torch"),
                               atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
