"""Shared test helpers: the float64 oracle in the users' layouts and tolerances."""

from __future__ import annotations

import math

import torch

from stfast.lowering import from5, lower, to5
from stfast.reference import oracle

CAUSAL_NAMES = {False: None, True: "top_left", "top_left": "top_left", "bottom_right": "bottom_right"}


def reference(kind, q, k, v, **kw):
    """(out, lse5) of the float64 oracle; out in the user's layout (q's, last dim Dv).
    Keyword arguments: causal, scale, mask, layout, head_strides."""
    with torch.no_grad():
        return _reference_graph(kind, *(t.detach().double().cpu() for t in (q, k, v)), **kw)


def reference_grads(kind, q, k, v, dout, **kw):
    """dq, dk, dv of the float64 oracle for upstream gradient ``dout``."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    out, _ = _reference_graph(kind, *leaves, **kw)
    out.backward(dout.double().cpu())
    return [t.grad for t in leaves]


def _reference_graph(kind, q, k, v, *, causal=False, scale=None, mask=None, layout=None, head_strides=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    lowered = layout.lowered("cpu", head_strides or (0, 0, 0)) if layout is not None else None
    if mask is not None:
        mask = mask.cpu() if mask.dtype == torch.bool else mask.double().cpu()
    p = lower(kind, q, k, v, scale=scale, causal=CAUSAL_NAMES[causal], mask=mask, layout=lowered)
    out5, lse5 = oracle(p)
    return from5(out5, kind), lse5


def assert_close(actual, expected, *, atol, rtol, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = (err - bound).max()
    assert worst <= 0, f"{what}: max abs error {err.max():.3e} exceeds atol={atol} rtol={rtol}"


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements of any storage an operation returns (views of a storage count
    as that storage, so broadcast views cost nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def poisoned_kernel_grads(kernel, p, q, k, v, dout):
    """out and dq, dk, dv in the users' shapes from a kernel backend's forward and
    backward on problem ``p``, every gradient buffer NaN-poisoned first."""
    out, out5 = p.new_output()
    lse5 = p.new_lse()
    kernel.forward(p, out5, lse5)
    grads = p.new_grads(q, k, v)
    for g, _ in grads:
        g.fill_(float("nan"))
    kernel.backward(p, out5, to5(dout, p.kind, p.groups), lse5, *(g5 for _, g5 in grads))
    return out, [g for g, _ in grads]

