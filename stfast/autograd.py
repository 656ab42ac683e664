"""The custom ops that wrap kernel backends (``triton``, ``cuda``) for autograd and
``torch.compile``.

``stfast::attention_fwd`` returns ``(out, lse)``; its autograd formula calls
``stfast::attention_bwd``.  Both take the caller's tensors as they are (strided
views included) and re-lower them inside, so the graph holds plain tensors and
``torch.compile(fullgraph=True)`` traces through without a break.  The ``torch``
backend needs none of this: autograd already tracks its operations.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .lowering import LoweredLayout, Problem, lower, to5


def _problem(q, k, v, mask, tables, block, head_strides, kind, causal, scale) -> Problem:
    layout = LoweredLayout.from_tables(tables, block, head_strides) if tables else None
    return lower(kind, q, k, v, scale=scale, causal=causal or None, mask=mask, layout=layout)


@torch.library.custom_op("stfast::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  tables: list[torch.Tensor], block: int, head_strides: list[int],
                  kind: str, causal: str, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = _problem(q, k, v, mask, tables, block, head_strides, kind, causal, scale)
    out, out5 = p.new_output()
    lse5 = p.new_lse()
    backends.get(backend).forward(p, out5, lse5)
    return out, lse5


@attention_fwd.register_fake
def _(q, k, v, mask, tables, block, head_strides, kind, causal, scale, backend):
    p = _problem(q, k, v, mask, tables, block, head_strides, kind, causal, scale)
    return p.new_output()[0], p.new_lse()


@torch.library.custom_op("stfast::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                  tables: list[torch.Tensor], block: int, head_strides: list[int],
                  kind: str, causal: str, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _problem(q, k, v, mask, tables, block, head_strides, kind, causal, scale)
    (dq, dq5), (dk, dk5), (dv, dv5) = p.new_grads(q, k, v)
    backends.get(backend).backward(p, to5(out, kind, p.groups), to5(dout, kind, p.groups), lse,
                                   dq5, dk5, dv5)
    return dq, dk, dv


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, tables, block, head_strides, kind, causal,
      scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, tables, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, *tables)
    ctx.num_tables = len(tables)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, *tables = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout.contiguous(), q, k, v, out, lse, mask, tables, *ctx.params)
    return (dq, dk, dv, None, [None] * ctx.num_tables) + (None,) * len(ctx.params)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
