"""dk/dv when k and/or v are broadcast (stride 0) over a batch axis of the lowering.

A k expanded over heads of a spatio-temporal problem has stride 0 along B2 exactly
like the k of a GQA problem, but its gradient buffer is a full tensor: every head's
dk/dv must be written, each from its own head's q, dO and v.  Gradient buffers are
NaN-poisoned so an unwritten head cannot pass.
"""

import pytest
import torch

from stfast.lowering import from5, lower
from stfast.reference import oracle

from helpers import poisoned_kernel_grads

triton_backend = pytest.importorskip("stfast.triton").BACKEND
launch = pytest.importorskip("stfast.triton.launch")

if triton_backend.unavailable_reason():
    pytest.skip(f"triton backend unavailable: {triton_backend.unavailable_reason()}",
                allow_module_level=True)

DEVICE = "cpu" if launch.INTERPRET else "cuda"
# float32 runs as TF32 on a GPU (IEEE float32 is refused there: it spills); the
# interpreter computes in IEEE float32.
TOL = dict(atol=1e-4, rtol=1e-4) if launch.INTERPRET else dict(atol=2e-3, rtol=2e-3)


@pytest.fixture(autouse=True)
def _tf32_on_gpu(allow_tf32):
    if not launch.INTERPRET:
        allow_tf32(True)


def _grads(kind, q, k, v, dout, causal):
    """Triton dq/dk/dv (NaN-poisoned buffers) and the float64 oracle's."""
    scale = q.shape[-1] ** -0.5
    p = lower(kind, q, k, v, scale=scale, causal=causal)
    out, grads = poisoned_kernel_grads(triton_backend, p, q, k, v, dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = from5(oracle(lower(kind, *leaves, scale=scale, causal=causal))[0], kind)
    torch.testing.assert_close(out.double(), ref.detach(), **TOL)
    return grads, torch.autograd.grad(ref, leaves, dout.double())


def _expand_heads(x, axis_of_heads):
    one = x.narrow(axis_of_heads, 0, 1)
    return one.expand(x.shape)


@pytest.mark.interpret
@pytest.mark.parametrize("which", ["k", "v", "kv"])
@pytest.mark.parametrize("kind,causal", [("space", None), ("time", "top_left"), ("dense", "bottom_right")])
@pytest.mark.parametrize("packed", [False, True])
def test_kv_expanded_over_heads(kind, causal, which, packed, monkeypatch):
    if not packed:
        monkeypatch.setattr(launch, "PACK_MAX_LEN", 0)
    shape = (1, 3, 5, 3, 8) if kind != "dense" else (1, 3, 13, 8)
    heads = 3 if kind != "dense" else 1
    q, k, v = (torch.randn(shape, device=DEVICE) for _ in range(3))
    if "k" in which:
        k = _expand_heads(k, heads)
    if "v" in which:
        v = _expand_heads(v, heads)
    assert (k.stride(heads) == 0) == ("k" in which)
    dout = torch.randn(shape, device=DEVICE)
    got, want = _grads(kind, q, k, v, dout, causal)
    for name, g, r in zip("qkv", got, want):
        assert not torch.isnan(g).any(), f"d{name}: entries never written"
        torch.testing.assert_close(g.double(), r, **TOL, msg=lambda m: f"d{name}: {m}")
