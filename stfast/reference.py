"""The float64 oracle: plain math on every score, O(L^2), for tests and benchmarks.

Nothing production depends on this file: the ``torch`` backend lives in
:mod:`stfast.torch_backend`, so the oracle stays an independent check of it.
"""

from __future__ import annotations

import torch

from .lowering import LoweredLayout, Problem


def safe_lse(scores: torch.Tensor, valid: torch.Tensor | None):
    """``(lse [..., 1], exp(scores - m), denom)`` with m the (detached) row max; a row
    with no valid key has LSE -inf, and every gradient stays finite (0 for such rows)."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    m = scores.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True)
    empty = denom == 0
    denom = torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, float("-inf"), m + torch.log(denom))
    return lse, p, denom


def safe_softmax_attend(scores: torch.Tensor, valid: torch.Tensor | None, v: torch.Tensor):
    """``softmax(scores) @ v`` and the log-sum-exp; rows with no valid key give output
    0 and LSE -inf, and their gradients are 0 (never NaN)."""
    lse, p, denom = safe_lse(scores, valid)
    out = (p.to(v.dtype) @ v) / denom.to(v.dtype)
    return out, lse.squeeze(-1)


def causal_visible(causal: str | None, q_pos: torch.Tensor, k_pos: torch.Tensor, lq: int, lk: int):
    """Bool ``[..., |q_pos|, |k_pos|]``: which keys the causal rule lets each query see."""
    offset = lk - lq if causal == "bottom_right" else 0
    return k_pos[..., None, :] <= q_pos[..., :, None] + offset


def _mask_terms(mask: torch.Tensor | None):
    """Split a user mask into (bool visibility or None, additive float or None)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    return None, mask


def layout_dense(layout: LoweredLayout, batch, lq: int, lk: int) -> torch.Tensor:
    """Bool ``[B0, B1, B2, Lq, Lk]`` visibility of a block layout.  O(L^2): oracle only."""
    b = layout.block
    heads = layout.head_index(batch, layout.block_type.device)
    bt = layout.block_type[heads]  # [B0, B1, B2, Mq, Mk]
    pm = torch.cat([layout.partial_masks,
                    torch.zeros(1, b, b, dtype=torch.bool, device=bt.device)])
    part = pm[layout.partial_index[heads].long()]  # [..., Mq, Mk, b, b]
    full = (bt == 1)[..., None, None].expand(part.shape)
    dense = (full | part).transpose(-3, -2)  # [..., Mq, b, Mk, b]
    dense = dense.reshape(*batch, bt.shape[-2] * b, bt.shape[-1] * b)
    return dense[..., :lq, :lk]


def oracle(problem: Problem, dtype: torch.dtype = torch.float64):
    """Plain math on every score: ``(out5, lse5)`` in ``dtype`` (float64 by default)."""
    p = problem
    q, k, v = (t.to(dtype) for t in (p.q, p.k, p.v))
    scores = (q @ k.transpose(-1, -2)) * p.scale
    valid = None
    visible, additive = _mask_terms(p.mask)
    if additive is not None:
        scores = scores + additive.to(dtype)
    if visible is not None:
        valid = visible
    if p.causal:
        c = causal_visible(p.causal, torch.arange(p.lq, device=q.device),
                           torch.arange(p.lk, device=q.device), p.lq, p.lk)
        valid = c if valid is None else valid & c
    if p.layout is not None:
        lay = layout_dense(p.layout, p.batch, p.lq, p.lk).to(q.device)
        valid = lay if valid is None else valid & lay
    return safe_softmax_attend(scores, valid, v)
