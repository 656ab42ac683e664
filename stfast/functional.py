"""The public attention functions: validate, lower, dispatch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import autograd, backends
from .layouts import BlockLayout
from .lowering import lower

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CAUSAL = {False: None, None: None, True: "top_left", "top_left": "top_left",
           "bottom_right": "bottom_right"}


def _check_tensor(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")


def _check_same(q, k, v, names=("q", "k", "v")) -> None:
    nq, nk, nv = names
    for name, t in ((nk, k), (nv, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have {nq}'s dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {nq}'s device {q.device}, got {t.device}")
    if q.shape[-1] < 1:
        raise ValueError(f"head dim must be >= 1, got {nq}.shape[-1]={q.shape[-1]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{nk}'s head dim must equal {nq}'s ({q.shape[-1]}), got {k.shape[-1]}")


def _check_flag(name: str, value) -> bool:
    # PyTorch's own functions take only real bools here; a truthy 'yes' or 1 is a bug.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")
    return value


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _check_causal(causal):
    # Only real bools and the two names: 1 or 1.0 would hash like True and slip through.
    if causal is None or isinstance(causal, bool) or (isinstance(causal, str) and causal in _CAUSAL):
        return _CAUSAL[causal]
    raise (ValueError if isinstance(causal, str) else TypeError)(
        f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}"
        f"{'' if isinstance(causal, str) else f' of type {type(causal).__name__}'}")


def _check_mask(attn_mask, shape: tuple[int, ...], device, name: str = "attn_mask"):
    """Broadcast a bool/additive mask to ``shape`` (a view), naming it in errors."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"{name} must be on device {device}, got {attn_mask.device}")
    try:
        return attn_mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} must be broadcastable to {list(shape)}, got shape "
                         f"{list(attn_mask.shape)}") from None


def _check_layout(layout, lq: int, lk: int, heads: int) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a stfast.BlockLayout or None, got {type(layout).__name__}")
    if (layout.seq_len_q, layout.seq_len_k) != (lq, lk):
        raise ValueError(f"layout must cover seq_len_q={lq}, seq_len_k={lk}; got a layout for "
                         f"seq_len_q={layout.seq_len_q}, seq_len_k={layout.seq_len_k}")
    if layout.num_heads not in (1, heads):
        raise ValueError(f"layout must have 1 or {heads} heads (one per query head), "
                         f"got {layout.num_heads}")


def _empty_result(q, k, v, out_shape, lse_shape, return_lse):
    """Zero-size problems: empty outputs, or zeros (LSE -inf) when there is no key."""
    out = q.new_zeros(out_shape)
    if any(t.requires_grad for t in (q, k, v)):
        # The sum of an empty slice is exactly 0 (even if the inputs hold NaN) and keeps
        # the inputs in the graph, so their gradients are zeros, not missing.
        out = out + sum(t.flatten()[:0].sum() for t in (q, k, v))
    lse = q.new_full(lse_shape, float("-inf"), dtype=torch.float32)
    return (out, lse) if return_lse else out


def _dispatch(kind, q, k, v, *, scale, causal, mask, layout, head_strides, return_lse, backend):
    lowered = layout.lowered(q.device, head_strides) if layout is not None else None
    p = lower(kind, q, k, v, scale=scale, causal=causal, mask=mask, layout=lowered)
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        if layout is not None:
            raise ValueError("attn_mask must not require grad together with a block-sparse layout: "
                             "mask gradients need a dense problem (layout=None)")
        chosen = backends.get("torch")  # only autograd-traced math gives a mask gradient
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend={backend!r} cannot run this problem: attn_mask requires "
                             f"grad, which only the torch backend supports")
    else:
        chosen = backends.select(p, backend, requires_grad=requires_grad)
    if chosen.differentiable:
        out, lse5 = chosen.run(p, need_lse=return_lse)
    else:
        tables = lowered.tables() if lowered is not None else []
        out, lse5 = autograd.attention_fwd(
            q, k, v, mask, tables, lowered.block if lowered else 0, list(head_strides), kind,
            causal or "", scale, chosen.name)
    return out, lse5


def attention(q, k, v, *, causal=False, scale=None, layout=None, return_lse=False, backend="auto"):
    """Attention over ``[B, H, L, D]`` tensors.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``, with
            ``Hq % Hkv == 0`` (GQA/MQA when ``Hkv < Hq``, K/V are never repeated).
        causal: ``False``, ``True``/``"top_left"`` (query i sees keys ``j <= i``) or
            ``"bottom_right"`` (``j <= i + Lk - Lq``, the KV-cache convention).
        scale: score scale, ``1/sqrt(D)`` by default.
        layout: a :class:`stfast.BlockLayout` for block-sparse attention.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (-inf for rows
            that see no key).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns ``out [B, Hq, Lq, Dv]`` (and the LSE).  Rows that see no key are 0.
    """
    _check_tensor("q", q, 4, "[B, H, L, D]")
    _check_tensor("k", k, 4, "[B, H, L, D]")
    _check_tensor("v", v, 4, "[B, H, L, D]")
    _check_same(q, k, v)
    b, hq, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"k and v must have q's batch size {b}, got {k.shape[0]} and {v.shape[0]}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v must have k's heads and length {tuple(k.shape[1:3])}, got {tuple(v.shape[1:3])}")
    hkv, lk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's head count ({hq}) must be a multiple of k/v's head count, got {hkv}")
    causal = _check_causal(causal)
    scale = _check_scale(scale, d)
    _check_flag("return_lse", return_lse)
    if layout is not None:
        _check_layout(layout, lq, lk, hq)
    if q.numel() == 0 or lk == 0 or v.shape[-1] == 0:
        return _empty_result(q, k, v, (b, hq, lq, v.shape[-1]), (b, hq, lq), return_lse)
    groups = hq // hkv
    head_strides = (0, groups, 1) if layout is not None and layout.num_heads > 1 else (0, 0, 0)
    out, lse5 = _dispatch("dense", q, k, v, scale=scale, causal=causal, mask=None, layout=layout,
                          head_strides=head_strides, return_lse=return_lse, backend=backend)
    return (out, lse5.flatten(1, 2)) if return_lse else out


def block_sparse_attention(q, k, v, layout, *, scale=None, backend="auto"):
    """Block-sparse attention over ``[B, H, L, D]`` with a :class:`stfast.BlockLayout`."""
    if layout is None:
        raise TypeError("layout must be a stfast.BlockLayout, got None")
    return attention(q, k, v, scale=scale, layout=layout, backend=backend)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, backend="auto"):
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Same arguments and results, except that a query row whose mask hides every key
    outputs zeros instead of NaN.  Batch and head dims broadcast as in PyTorch (size 1
    against any size, k/v with one head against q's heads: multi-query), as stride-0
    views.  ``attn_mask`` may be a ``torch.nn.attention.bias.CausalBias``
    (``causal_upper_left`` / ``causal_lower_right``): it runs as ``causal="top_left"`` /
    ``"bottom_right"``, never as a dense mask.  Dropout and tensors of other than 4
    dims run on PyTorch's own SDPA.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1], got {dropout_p!r} of type "
                        f"{type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    _check_flag("is_causal", is_causal)
    _check_flag("enable_gqa", enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (as in PyTorch's SDPA)")
    if dropout_p > 0.0 or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    _check_tensor("query", query, 4, "[B, H, L, D]")
    _check_tensor("key", key, 4, "[B, H, L, D]")
    _check_tensor("value", value, 4, "[B, H, L, D]")
    query, key, value = _broadcast_sdpa(query, key, value, enable_gqa)
    _check_same(query, key, value, names=("query", "key", "value"))
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if value.shape[2] != lk:
        raise ValueError(f"value must have key's length {lk}, got {value.shape[2]}")
    causal = _causal_bias(attn_mask, lq, lk)
    if causal is not None:
        return attention(query, key, value, causal=causal, scale=scale, backend=backend)
    mask = _check_mask(attn_mask, (b, hq, lq, lk), query.device)
    if mask is None:
        return attention(query, key, value, causal=is_causal, scale=scale, backend=backend)
    scale = _check_scale(scale, query.shape[-1])
    if query.numel() == 0 or lk == 0:
        return _empty_result(query, key, value, (b, hq, lq, value.shape[-1]), (b, hq, lq), False)
    out, _ = _dispatch("dense", query, key, value, scale=scale, causal=None, mask=mask, layout=None,
                       head_strides=(0, 0, 0), return_lse=False, backend=backend)
    return out


def _broadcast_sdpa(query, key, value, enable_gqa: bool):
    """Batch and head dims broadcast as PyTorch's SDPA does, as stride-0 views.

    k/v heads broadcast against each other; then k/v with one head (or, with
    ``enable_gqa``, a divisor of q's heads) stay as they are and run as GQA/MQA (never
    repeated), and q with one head is expanded to k/v's heads.
    """
    sizes = {"query": query.shape[0], "key": key.shape[0], "value": value.shape[0]}
    batch = max(sizes.values())
    if any(s not in (1, batch) for s in sizes.values()):
        raise ValueError(f"query, key and value batch sizes must be equal or 1 (broadcast as in "
                         f"F.scaled_dot_product_attention), got " +
                         ", ".join(f"{n} {s}" for n, s in sizes.items()))
    hq, hk, hv = query.shape[1], key.shape[1], value.shape[1]
    if hk != hv and 1 not in (hk, hv):
        raise ValueError(f"key and value must have the same number of heads (or 1, broadcast), "
                         f"got key {hk} and value {hv}")
    hkv = max(hk, hv)
    if hq != hkv and hkv != 1:
        if enable_gqa:
            if hq % hkv:  # PyTorch does not broadcast q's heads under enable_gqa either
                raise ValueError(f"query's head count ({hq}) must be a multiple of key's with "
                                 f"enable_gqa=True, got {hkv}")
        elif hq == 1:
            hq = hkv
        else:
            raise ValueError(f"key must have query's {hq} heads (or 1, broadcast) unless "
                             f"enable_gqa=True, got {hkv}")
    return (query.expand(batch, hq, -1, -1), key.expand(batch, hkv, -1, -1),
            value.expand(batch, hkv, -1, -1))


def _causal_bias(attn_mask, lq: int, lk: int):
    """The causal mode of a ``torch.nn.attention.bias.CausalBias`` mask, else None."""
    if not isinstance(attn_mask, CausalBias):
        return None
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (lq, lk):
        raise ValueError(f"attn_mask (a CausalBias) must be built for seq_len_q={lq}, "
                         f"seq_len_kv={lk}, got seq_len_q={attn_mask.seq_len_q}, "
                         f"seq_len_kv={attn_mask.seq_len_kv}")
    if attn_mask.variant == CausalVariant.UPPER_LEFT:
        return "top_left"
    if attn_mask.variant == CausalVariant.LOWER_RIGHT:
        return "bottom_right"
    raise ValueError(f"attn_mask is a CausalBias of unknown variant {attn_mask.variant!r}")


def spatiotemporal_attention(q, k, v, *, axis, causal=False, scale=None, attn_mask=None,
                             layout=None, backend="auto"):
    """Factorized attention over ``[B, T, N, H, D]`` tensors, without permutes or copies.

    Args:
        q: ``[B, Tq, Nq, H, D]``; k: ``[B, Tk, Nk, H, D]``; v: ``[B, Tk, Nk, H, Dv]``.
            Only the attended axis may differ between q and k/v (cross-attention:
            ``Tq != Tk`` for ``axis="time"``, e.g. GMAN's transform attention from 12
            history steps to 6 prediction steps; ``Nq != Nk`` for ``axis="space"``).
        axis: ``"space"``: each (b, t, h) attends over its N tokens; ``"time"``: each
            (b, n, h) attends over its T steps.
        causal: causal along the attended axis (``True``/``False``), top-left aligned:
            query ``i`` sees keys ``j <= i``.
        attn_mask: bool (True = attend) or additive float, broadcastable to ``[Lq, Lk]``
            of the attended axis (e.g. a graph adjacency ``[N, N]`` for space).
        layout: a :class:`stfast.BlockLayout` over the attended axis (1 or H heads).

    Returns ``out [B, Tq, Nq, H, Dv]`` (a fresh tensor).
    """
    if axis not in ("space", "time"):
        raise ValueError(f"axis must be 'space' or 'time', got {axis!r}")
    _check_tensor("q", q, 5, "[B, T, N, H, D]")
    _check_tensor("k", k, 5, "[B, T, N, H, D]")
    _check_tensor("v", v, 5, "[B, T, N, H, D]")
    _check_same(q, k, v)
    # Every index but the attended one is a batch index that q, k and v share.
    attended = 2 if axis == "space" else 1
    batch_q = [s for i, s in enumerate(q.shape[:4]) if i != attended]
    dims = "[B, N, H]" if axis == "time" else "[B, T, H]"
    for name, t in (("k", k), ("v", v)):
        got = [s for i, s in enumerate(t.shape[:4]) if i != attended]
        if got != batch_q:
            raise ValueError(f"{name} must match q's {dims} = {batch_q} for axis={axis!r} "
                             f"(only the attended {'N' if axis == 'space' else 'T'} may differ), "
                             f"got {got} (shape {list(t.shape)})")
    if v.shape[attended] != k.shape[attended]:
        raise ValueError(f"v must have k's length {k.shape[attended]} along the attended axis, "
                         f"got {v.shape[attended]}")
    if not isinstance(causal, bool):
        raise (ValueError if isinstance(causal, str) else TypeError)(
            f"causal must be True or False, got {causal!r} of type {type(causal).__name__}")
    scale = _check_scale(scale, q.shape[-1])
    lq, lk = q.shape[attended], k.shape[attended]
    mask = _check_mask(attn_mask, (lq, lk), q.device)
    if layout is not None:
        _check_layout(layout, lq, lk, q.shape[3])
    if q.numel() == 0 or lk == 0 or v.shape[-1] == 0:
        out_shape = (*q.shape[:4], v.shape[-1])
        return _empty_result(q, k, v, out_shape, out_shape[:4], False)
    head_strides = (0, 0, 1) if layout is not None and layout.num_heads > 1 else (0, 0, 0)
    out, _ = _dispatch(axis, q, k, v, scale=scale, causal="top_left" if causal else None, mask=mask,
                       layout=layout, head_strides=head_strides, return_lse=False, backend=backend)
    return out
