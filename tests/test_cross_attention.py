"""Cross-attention along one axis of ``[B, T, N, H, D]``: Tq != Tk for axis="time",
Nq != Nk for axis="space", causal top-left, on the torch backend and under the
Triton interpreter, against the float64 oracle."""

import os

import pytest
import torch

import stfast
from helpers import assert_close, reference, reference_grads

# The Triton kernels run on the GPU, or on the CPU under TRITON_INTERPRET=1 (conftest).
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# (axis, q shape [B, T, N, H, D], attended length of k/v): GMAN maps 12 history steps
# to 6 prediction steps; the reverse and the spatial case exercise both Lq < Lk and Lq > Lk.
CASES = [("time", (2, 6, 5, 2, 8), 12), ("time", (1, 13, 3, 2, 16), 5),
         ("space", (2, 3, 7, 2, 8), 19), ("space", (1, 2, 21, 1, 16), 9)]


def _inputs(axis, q_shape, lk, dv=None, device="cpu"):
    b, t, n, h, d = q_shape
    kv = (b, lk, n, h) if axis == "time" else (b, t, lk, h)
    q = torch.randn(*q_shape, device=device, requires_grad=True)
    k = torch.randn(*kv, d, device=device, requires_grad=True)
    v = torch.randn(*kv, dv or d, device=device, requires_grad=True)
    return q, k, v


def _check(axis, q, k, v, backend, tol, **kw):
    out = stfast.spatiotemporal_attention(q, k, v, axis=axis, backend=backend, **kw)
    mask = kw.get("attn_mask")
    ref, _ = reference(axis, q, k, v, causal=kw.get("causal", False), mask=mask)
    assert out.shape == (*q.shape[:4], v.shape[-1])
    assert_close(out, ref, **tol, what="out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = reference_grads(axis, q, k, v, dout, causal=kw.get("causal", False), mask=mask)
    for name, got, exp in zip("qkv", grads, want):
        assert_close(got, exp, **tol, what=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("axis,q_shape,lk", CASES)
def test_cross_attention_along_an_axis_torch(axis, q_shape, lk, causal):
    q, k, v = _inputs(axis, q_shape, lk, dv=12)
    _check(axis, q, k, v, "torch", dict(atol=5e-5, rtol=5e-5), causal=causal)


def test_cross_attention_mask_is_lq_by_lk():
    q, k, v = _inputs("space", (2, 3, 7, 2, 8), 11)
    adjacency = torch.rand(7, 11) > 0.5
    adjacency[2] = False  # a query node with no neighbour among the keys: zeros
    _check("space", q, k, v, "torch", dict(atol=5e-5, rtol=5e-5), attn_mask=adjacency)
    with pytest.raises(ValueError, match=r"attn_mask must be broadcastable to \[7, 11\], got shape \[7, 7\]"):
        stfast.spatiotemporal_attention(q, k, v, axis="space", attn_mask=adjacency[:, :7])


def test_cross_attention_rejects_other_mismatches():
    q, k, v = _inputs("time", (2, 6, 5, 2, 8), 12)
    with pytest.raises(ValueError, match=r"k must match q's \[B, N, H\] = \[2, 5, 2\] for axis='time'"):
        stfast.spatiotemporal_attention(q, k[:, :, :4], v[:, :, :4], axis="time")
    with pytest.raises(ValueError, match=r"k must match q's \[B, T, H\] = \[2, 6, 2\] for axis='space'"):
        stfast.spatiotemporal_attention(q, k, v, axis="space")
    with pytest.raises(ValueError, match="v must have k's length 12 along the attended axis, got 11"):
        stfast.spatiotemporal_attention(q, k, v[:, :11], axis="time")


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("axis,q_shape,lk", CASES)
def test_cross_attention_along_an_axis_triton(axis, q_shape, lk, causal):
    backend = stfast.backends.get("triton")
    if backend.unavailable_reason():
        pytest.skip(f"triton backend unavailable: {backend.unavailable_reason()}")
    q, k, v = _inputs(axis, q_shape, lk, device=TRITON_DEVICE)
    _check(axis, q, k, v, "triton", dict(atol=1e-4, rtol=1e-4), causal=causal)


def test_cross_attention_module_matches_hand_written_gman_transform_attention():
    torch.manual_seed(0)
    b, t_his, t_pred, n, c, h = 2, 12, 6, 5, 16, 4
    m = stfast.SpatioTemporalCrossAttention(c, h, axis="time", backend="torch").double()
    ste_pred = torch.randn(b, t_pred, n, c, dtype=torch.float64)
    ste_his = torch.randn(b, t_his, n, c, dtype=torch.float64)
    x = torch.randn(b, t_his, n, c, dtype=torch.float64)
    out = m(ste_pred, ste_his, x)
    # GMAN: per node, prediction steps attend over history steps (permute + SDPA).
    fold = lambda z: z.unflatten(-1, (h, c // h)).permute(0, 2, 3, 1, 4)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(
        fold(m.q_proj(ste_pred)), fold(m.k_proj(ste_his)), fold(m.v_proj(x)))
    want = m.proj(want.permute(0, 3, 1, 2, 4).flatten(-2))
    assert out.shape == (b, t_pred, n, c)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match=r"value must have key's shape \(2, 12, 5, 16\), got \(2, 6, 5, 16\)"):
        m(ste_pred, ste_his, ste_pred)
