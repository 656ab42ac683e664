"""stfast.scaled_dot_product_attention against F.scaled_dot_product_attention: batch and
head broadcasting (as stride-0 views) and CausalBias masks (as causal modes)."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import stfast
from stfast import functional

# The Triton kernels run on the GPU, or on the CPU under TRITON_INTERPRET=1 (conftest).
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# (q [B, H], k [B, H], v [B, H], enable_gqa)
BROADCASTS = [
    ((2, 4), (2, 1), (2, 1), False),  # multi-query by broadcasting
    ((2, 4), (1, 4), (1, 4), False),  # k/v batch 1 against q batch 2
    ((1, 4), (2, 4), (2, 4), False),  # q batch 1 against k/v batch 2
    ((2, 4), (1, 1), (1, 1), False),
    ((1, 1), (2, 4), (2, 4), False),  # q broadcast over batch and heads
    ((2, 4), (2, 4), (1, 4), False),  # key and value broadcast differently
    ((1, 4), (2, 2), (2, 1), True),   # GQA with broadcast batch and value heads
]


def _inputs(qs, ks, vs, lq=5, lk=7, d=8, dv=6, dtype=torch.float64, device="cpu"):
    def make(bh, length, dim):
        return torch.randn(*bh, length, dim, dtype=dtype, device=device, requires_grad=True)
    return make(qs, lq, d), make(ks, lk, d), make(vs, lk, dv)


def _compare(q, k, v, backend, tol, **kw):
    out = stfast.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, **kw)
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    dout = torch.randn_like(want)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    want_grads = torch.autograd.grad(want, leaves, dout)
    for name, got, exp in zip(("query", "key", "value"), grads, want_grads):
        assert got.shape == exp.shape, name
        torch.testing.assert_close(got.double(), exp, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("qs,ks,vs,gqa", BROADCASTS)
def test_broadcasting_matches_pytorch(qs, ks, vs, gqa, causal):
    q, k, v = _inputs(qs, ks, vs)
    _compare(q, k, v, "torch", dict(atol=1e-10, rtol=1e-10), is_causal=causal, enable_gqa=gqa)


@pytest.mark.parametrize("qs,ks,vs,gqa", BROADCASTS[:5])
def test_broadcasting_with_a_mask_matches_pytorch(qs, ks, vs, gqa):
    q, k, v = _inputs(qs, ks, vs)
    mask = torch.rand(1, 4 if 4 in (qs[1], ks[1]) else 1, 5, 7) > 0.3
    _compare(q, k, v, "torch", dict(atol=1e-10, rtol=1e-10), attn_mask=mask, enable_gqa=gqa)


@pytest.mark.interpret
@pytest.mark.parametrize("qs,ks,vs,gqa", BROADCASTS)
def test_broadcasting_on_triton(qs, ks, vs, gqa):
    backend = stfast.backends.get("triton")
    if backend.unavailable_reason():
        pytest.skip(f"triton backend unavailable: {backend.unavailable_reason()}")
    q, k, v = _inputs(qs, ks, vs, dtype=torch.float32, device=TRITON_DEVICE)
    _compare(q, k, v, "triton", dict(atol=1e-4, rtol=1e-4), enable_gqa=gqa)


@pytest.mark.parametrize("qs,ks,vs,gqa", BROADCASTS)
def test_broadcast_inputs_reach_the_backend_as_stride0_views(monkeypatch, qs, ks, vs, gqa):
    seen = []

    def spy(*args, **kwargs):
        p = lower(*args, **kwargs)
        seen.append(p)
        return p

    lower = functional.lower
    monkeypatch.setattr(functional, "lower", spy)
    q, k, v = _inputs(qs, ks, vs)
    stfast.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, backend="torch")
    (p,) = seen
    for user, t5 in ((q, p.q), (k, p.k), (v, p.v)):
        # The user's own memory: broadcast dims are stride 0, nothing was repeated.
        assert t5.untyped_storage().data_ptr() == user.untyped_storage().data_ptr()
        assert t5.untyped_storage().nbytes() == user.untyped_storage().nbytes()


def test_bad_broadcasts_are_named():
    q, k, v = _inputs((2, 4), (3, 4), (3, 4))
    with pytest.raises(ValueError, match="batch sizes must be equal or 1 .* got query 2, key 3, value 3"):
        stfast.scaled_dot_product_attention(q, k, v)
    q, k, v = _inputs((2, 4), (2, 2), (2, 3))
    with pytest.raises(ValueError, match="key and value must have the same number of heads .* got key 2 and value 3"):
        stfast.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    q, k, v = _inputs((2, 4), (2, 3), (2, 3))
    with pytest.raises(ValueError, match=r"query's head count \(4\) must be a multiple of key's with enable_gqa=True, got 3"):
        stfast.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    # One query head broadcasts against k/v's heads, but not under enable_gqa (PyTorch
    # raises there too).
    q, k, v = _inputs((2, 1), (2, 4), (2, 4))
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match=r"query's head count \(1\) must be a multiple of key's with enable_gqa=True, got 4"):
        stfast.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("lq,lk", [(5, 5), (5, 9), (1, 4)])
@pytest.mark.parametrize("bias,causal", [(causal_upper_left, "top_left"), (causal_lower_right, "bottom_right")])
def test_causal_bias_runs_as_a_causal_mode(monkeypatch, bias, causal, lq, lk):
    seen = []

    def spy(*args, **kwargs):
        p = lower(*args, **kwargs)
        seen.append(p)
        return p

    lower = functional.lower
    monkeypatch.setattr(functional, "lower", spy)
    q, k, v = _inputs((2, 4), (2, 2), (2, 2), lq=lq, lk=lk)
    _compare(q, k, v, "torch", dict(atol=1e-10, rtol=1e-10), attn_mask=bias(lq, lk), enable_gqa=True)
    assert seen and all(p.causal == causal and p.mask is None for p in seen)


@pytest.mark.interpret
def test_causal_bias_on_triton():
    backend = stfast.backends.get("triton")
    if backend.unavailable_reason():
        pytest.skip(f"triton backend unavailable: {backend.unavailable_reason()}")
    q, k, v = _inputs((1, 2), (1, 2), (1, 2), lq=6, lk=11, dtype=torch.float32, device=TRITON_DEVICE)
    _compare(q, k, v, "triton", dict(atol=1e-4, rtol=1e-4), attn_mask=causal_lower_right(6, 11))


def test_causal_bias_errors():
    q, k, v = _inputs((1, 2), (1, 2), (1, 2), lq=5, lk=7)
    with pytest.raises(ValueError, match="attn_mask must be None when is_causal=True"):
        stfast.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 7), is_causal=True)
    with pytest.raises(ValueError, match=r"CausalBias\) must be built for seq_len_q=5, seq_len_kv=7, "
                                         r"got seq_len_q=5, seq_len_kv=6"):
        stfast.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 6))
