"""Drop-in ``nn.Module``s: they only wire parameters to :mod:`stfast.functional`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, functional, layouts
from .functional import _check_flag
from .layouts import BlockLayout

MODES = ("space", "time", "joint", "divided", "heads", "gated")


def _check_heads(dim: int, num_heads: int) -> int:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of dim={dim}, got {num_heads!r}")
    return dim // num_heads


def _check_input(x, ndim: int, dim: int, what: str, *, name: str = "x", weight=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape {what} with C={dim}, got {tuple(x.shape)}")
    if weight is not None and x.dtype != weight.dtype and not _autocast(x):
        raise TypeError(f"{name} must have the module's parameter dtype {weight.dtype}, got "
                        f"{x.dtype} (convert the module with .to({x.dtype}) or the input with "
                        f".to({weight.dtype}))")


def _autocast(x: torch.Tensor) -> bool:
    # Under autocast nn.Linear takes any float input: mixed dtypes are expected there.
    return torch.is_autocast_enabled(x.device.type)


def _check_spatial_mask(mask, x: torch.Tensor) -> None:
    """A spatial mask must broadcast to ``[N, N]``; one that fits ``[T, T]`` instead
    usually means x is ``[B, N, T, C]``."""
    _, t, n, _ = x.shape
    try:
        functional._check_mask(mask, (n, n), x.device, name="spatial_mask")
    except ValueError as exc:
        if t != n and isinstance(mask, torch.Tensor) and mask.dim() <= 2 and \
                all(s in (1, t) for s in mask.shape):
            raise ValueError(f"{exc}: it fits [T, T] = [{t}, {t}] instead; is x laid out "
                             f"[B, N, T, C] = {list(x.shape)} instead of [B, T, N, C]?") from None
        raise


def _check_backend(backend) -> str:
    names = ("auto",) + backends.BACKEND_NAMES
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    return backend


class _AxisAttention(nn.Module):
    """One qkv projection, attention along one axis of ``[B, T, N, C]``, one output
    projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_views(self, x: torch.Tensor):
        """q, k, v as ``[B, T, N, H, D]`` strided views of one fused projection."""
        b, t, n, c = x.shape
        return self.qkv(x).view(b, t, n, 3, self.num_heads, c // self.num_heads).unbind(3)

    def forward(self, x, axis, *, causal=False, attn_mask=None, layout=None, backend="auto"):
        q, k, v = self.qkv_views(x)
        out = functional.spatiotemporal_attention(q, k, v, axis=axis, causal=causal,
                                                  attn_mask=attn_mask, layout=layout, backend=backend)
        return self.proj(out.reshape(x.shape))


class SpatioTemporalAttention(nn.Module):
    """Factorized attention over video / sensor-graph tokens ``x: [B, T, N, C]``.

    Modes:
        ``"space"``: each frame attends over its N tokens.
        ``"time"``: each token position attends over the T frames (``causal_time``:
        never the future).
        ``"joint"``: all T*N tokens (``causal_time``: frame-block causal).
        ``"divided"``: time, then space, with separate projections (TimeSformer order).
        ``"heads"``: half the heads attend over space, half over time, one projection
        (ViViT factorised dot-product attention).
        ``"gated"``: space and time in parallel from the same input, fused by a learned
        sigmoid gate ``z``: ``z * space + (1 - z) * time`` (GMAN gated fusion).

    ``spatial_mask`` (forward) and ``spatial_layout`` (init) restrict the space
    passes: a bool/additive ``[N, N]`` mask such as a graph adjacency, or a
    :class:`stfast.BlockLayout` over N.

    ``"joint"`` with ``causal_time`` builds a frame-causal :class:`BlockLayout` on the
    first call for each (T, N) and keeps it; building it is data-dependent, so under
    ``torch.compile(fullgraph=True)`` run the module once eagerly for each (T, N) first.
    """

    def __init__(self, dim: int, num_heads: int, *, mode: str = "divided", causal_time: bool = False,
                 qkv_bias: bool = True, spatial_layout: BlockLayout | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "heads" and num_heads % 2:
            raise ValueError(f"mode='heads' splits the heads in two: num_heads must be even, got {num_heads}")
        if spatial_layout is not None and not isinstance(spatial_layout, BlockLayout):
            raise TypeError(f"spatial_layout must be a stfast.BlockLayout or None, "
                            f"got {type(spatial_layout).__name__}")
        if spatial_layout is not None and mode == "joint":
            raise ValueError("spatial_layout is not supported with mode='joint' (use "
                             "stfast.BlockSparseSelfAttention over the T*N tokens)")
        self.dim, self.num_heads, self.mode = dim, num_heads, mode
        self.causal_time = _check_flag("causal_time", causal_time)
        self.spatial_layout = spatial_layout
        self.backend = _check_backend(backend)
        if mode in ("divided", "gated"):
            self.temporal = _AxisAttention(dim, num_heads, qkv_bias)
            self.spatial = _AxisAttention(dim, num_heads, qkv_bias)
        else:
            self.attn = _AxisAttention(dim, num_heads, qkv_bias)
        if mode == "gated":
            self.gate_space = nn.Linear(dim, dim, bias=False)
            self.gate_time = nn.Linear(dim, dim)
        self._joint_layouts: dict = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, "
                f"causal_time={self.causal_time}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor, spatial_mask: torch.Tensor | None = None) -> torch.Tensor:
        first = self.temporal if self.mode in ("divided", "gated") else self.attn
        _check_input(x, 4, self.dim, "[B, T, N, C]", weight=first.qkv.weight)
        if spatial_mask is not None and self.mode in ("time", "joint"):
            raise ValueError(f"spatial_mask is not supported with mode={self.mode!r}")
        if spatial_mask is not None:
            _check_spatial_mask(spatial_mask, x)
        space = dict(attn_mask=spatial_mask, layout=self.spatial_layout, backend=self.backend)
        time = dict(causal=self.causal_time, backend=self.backend)
        if self.mode == "space":
            return self.attn(x, "space", **space)
        if self.mode == "time":
            return self.attn(x, "time", **time)
        if self.mode == "divided":
            return self.spatial(self.temporal(x, "time", **time), "space", **space)
        if self.mode == "gated":
            hs = self.spatial(x, "space", **space)
            ht = self.temporal(x, "time", **time)
            z = torch.sigmoid(self.gate_space(hs) + self.gate_time(ht))
            return z * hs + (1 - z) * ht
        if self.mode == "heads":
            return self._heads(x, space, time)
        return self._joint(x)

    def _heads(self, x, space, time):
        q, k, v = self.attn.qkv_views(x)
        half = self.num_heads // 2
        out_space = functional.spatiotemporal_attention(
            q[..., :half, :], k[..., :half, :], v[..., :half, :], axis="space", **space)
        out_time = functional.spatiotemporal_attention(
            q[..., half:, :], k[..., half:, :], v[..., half:, :], axis="time", **time)
        return self.attn.proj(torch.cat([out_space, out_time], dim=3).reshape(x.shape))

    def _joint(self, x):
        b, t, n, c = x.shape
        q, k, v = (z.reshape(b, t * n, self.num_heads, self.head_dim).transpose(1, 2)
                   for z in self.attn.qkv_views(x))
        layout = None
        if self.causal_time and t > 1:
            if (t, n) not in self._joint_layouts:
                self._joint_layouts[(t, n)] = layouts.frame_causal(t, n)
            layout = self._joint_layouts[(t, n)]
        out = functional.attention(q, k, v, layout=layout, backend=self.backend)
        return self.attn.proj(out.transpose(1, 2).reshape(x.shape))


class SpatioTemporalCrossAttention(nn.Module):
    """Cross-attention along one axis of ``[B, T, N, C]`` tokens: queries from one
    sequence, keys and values from another that differs only along that axis.

    ``axis="time"``: query ``[B, Tq, N, C]`` attends, per node, over key/value
    ``[B, Tk, N, C]`` (GMAN's transform attention: ``query`` embeds the prediction
    steps, ``key`` the history steps, ``value`` the encoder output).
    ``axis="space"``: query ``[B, T, Nq, C]`` attends, per step, over ``[B, T, Nk, C]``.
    ``causal`` is top-left aligned along the axis (query ``i`` sees keys ``j <= i``);
    ``attn_mask`` (forward) is bool/additive, broadcastable to ``[Lq, Lk]`` of the axis.

    Separate q, k and v projections (``q_proj``, ``k_proj``, ``v_proj``), as the inputs
    differ, then ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, *, axis: str = "time", causal: bool = False,
                 qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        if axis not in ("space", "time"):
            raise ValueError(f"axis must be 'space' or 'time', got {axis!r}")
        _check_flag("causal", causal)
        self.dim, self.num_heads, self.axis, self.causal = dim, num_heads, axis, causal
        self.backend = _check_backend(backend)
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, axis={self.axis!r}, "
                f"causal={self.causal}, backend={self.backend!r}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``value`` defaults to ``key``.  Returns ``[B, Tq, Nq, C]``."""
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            _check_input(t, 4, self.dim, "[B, T, N, C]", name=name, weight=self.q_proj.weight)
        if value.shape != key.shape:
            raise ValueError(f"value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}")
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).unflatten(-1, (h, d))
        k = self.k_proj(key).unflatten(-1, (h, d))
        v = self.v_proj(value).unflatten(-1, (h, d))
        out = functional.spatiotemporal_attention(q, k, v, axis=self.axis, causal=self.causal,
                                                  attn_mask=attn_mask, backend=self.backend)
        return self.proj(out.flatten(-2))


class CausalSelfAttention(nn.Module):
    """GPT-style causal self-attention over ``x: [B, L, C]`` with optional GQA
    (``num_kv_heads`` < ``num_heads``)."""

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads={num_heads}, got {num_kv_heads!r}")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.backend = _check_backend(backend)
        self.qkv = nn.Linear(dim, dim + 2 * num_kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 3, self.dim, "[B, L, C]", weight=self.qkv.weight)
        b, length, _ = x.shape
        qkv = self.qkv(x).view(b, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([self.num_heads, self.num_kv_heads, self.num_kv_heads], 1)
        out = functional.attention(q, k, v, causal=True, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class BlockSparseSelfAttention(nn.Module):
    """Self-attention over ``x: [B, L, C]`` restricted to a :class:`stfast.BlockLayout`
    (shared, or one pattern per head)."""

    def __init__(self, dim: int, num_heads: int, layout: BlockLayout, *, qkv_bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a stfast.BlockLayout, got {type(layout).__name__}")
        if layout.num_heads not in (1, num_heads):
            raise ValueError(f"layout must have 1 or {num_heads} heads, got {layout.num_heads}")
        if layout.seq_len_k != layout.seq_len_q:
            raise ValueError(f"layout must be square for self-attention (seq_len_k == seq_len_q), "
                             f"got seq_len_q={layout.seq_len_q}, seq_len_k={layout.seq_len_k}")
        self.dim, self.num_heads, self.layout = dim, num_heads, layout
        self.backend = _check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 3, self.dim, "[B, L, C]", weight=self.qkv.weight)
        b, length, _ = x.shape
        if length != self.layout.seq_len_q:
            raise ValueError(f"x must have L={self.layout.seq_len_q} tokens (the layout's "
                             f"seq_len), got {length}")
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = functional.block_sparse_attention(q, k, v, self.layout, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention`: same arguments, parameter
    names and ``state_dict``.

    When attention weights are not requested (``need_weights=False``) and neither
    dropout, ``add_zero_attn`` nor unbatched input is involved, the attention runs
    on stfast's kernels; otherwise it is PyTorch's own implementation.  One
    difference: a query that every mask hides gets zeros, not NaN.

    ``torch.jit.script`` works, but a scripted module runs PyTorch's own
    ``F.multi_head_attention_forward`` on the same parameters, never stfast's kernels:
    their dispatch (backend choice, lowering, custom ops) is Python that TorchScript
    cannot compile.  Use ``torch.compile`` to keep the kernels in a compiled model.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.jit.is_scripting():
            # TorchScript cannot compile stfast's Python dispatch: a scripted module is
            # PyTorch's own multi-head attention on the same parameters.
            return self._scripted_forward(query, key, value, key_padding_mask, need_weights,
                                          attn_mask, average_attn_weights, is_causal)
        return self._stfast_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)

    def _scripted_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          key_padding_mask: torch.Tensor | None, need_weights: bool,
                          attn_mask: torch.Tensor | None, average_attn_weights: bool,
                          is_causal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
            self.in_proj_bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    @torch.jit.unused
    def _stfast_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        key_padding_mask: torch.Tensor | None, need_weights: bool,
                        attn_mask: torch.Tensor | None, average_attn_weights: bool,
                        is_causal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_args(query, key, value, key_padding_mask, need_weights, attn_mask,
                         average_attn_weights, is_causal)
        if (need_weights or self.add_zero_attn or (self.training and self.dropout > 0)
                or query.dim() != 3):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise ValueError("attn_mask must be given with is_causal=True (as in torch.nn.MultiheadAttention)")
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        lq, b, _ = query.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, b, -1)])
            v = torch.cat([v, self.bias_v.expand(1, b, -1)])
        lk = k.shape[0]
        q, k, v = (t.view(t.shape[0], b, h, d).permute(1, 2, 0, 3) for t in (q, k, v))
        mask = self._merged_mask(attn_mask, key_padding_mask, b, lq, lk, q.dtype)
        if is_causal and key_padding_mask is None and self.bias_k is None:
            out = functional.attention(q, k, v, causal=True, backend=self.backend)
        else:
            out = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=self.backend)
        out = F.linear(out.permute(2, 0, 1, 3).reshape(lq, b, h * d), self.out_proj.weight,
                       self.out_proj.bias)
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _check_args(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                    average_attn_weights, is_causal):
        """Bad input as ValueError/TypeError before any projection, where
        nn.MultiheadAttention raises AssertionError, fails inside ``.view``/``F.linear``
        or silently reinterprets a mask."""
        for name, flag in (("need_weights", need_weights), ("average_attn_weights", average_attn_weights),
                           ("is_causal", is_causal)):
            _check_flag(name, flag)
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must be {query.dim()}-D like query, got shape {tuple(t.shape)}")
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim),
                             ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have embedding dim {dim} (last dim), got shape "
                                 f"{tuple(t.shape)}")
            if t.dtype != weight.dtype and not _autocast(t):
                raise TypeError(f"{name} must have the module's parameter dtype {weight.dtype}, got "
                                f"{t.dtype} (convert the module with .to({t.dtype}) or the input)")
        batched = query.dim() == 3
        seq_dim, batch_dim = (1, 0) if self.batch_first and batched else (0, 1)
        b = query.shape[batch_dim] if batched else None
        lq, lk = query.shape[seq_dim], key.shape[seq_dim]
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"value must match key's leading dims {tuple(key.shape[:-1])}, got "
                             f"{tuple(value.shape[:-1])}")
        if batched and key.shape[batch_dim] != b:
            raise ValueError(f"key and value must have query's batch size {b} (dim {batch_dim}), "
                             f"got {key.shape[batch_dim]}")
        if key_padding_mask is not None:
            _check_mask_dtype("key_padding_mask", key_padding_mask)
            want, what = ((b, lk), "(batch, source length)") if batched else ((lk,), "(source length,)")
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"key_padding_mask must have shape {what} = {want}, "
                                 f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            _check_mask_dtype("attn_mask", attn_mask)
            heads, what = (b * self.num_heads, "batch * num_heads") if batched else (self.num_heads, "num_heads")
            if tuple(attn_mask.shape) not in ((lq, lk), (heads, lq, lk)):
                raise ValueError(f"attn_mask must have shape (target length, source length) = {(lq, lk)} "
                                 f"or ({what}, target length, source length) = {(heads, lq, lk)}, "
                                 f"got {tuple(attn_mask.shape)}")

    def _project(self, query, key, value):
        e = self.embed_dim
        bias = self.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.split(e)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(e)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _merged_mask(self, attn_mask, key_padding_mask, b, lq, lk, dtype):
        """Torch MHA masks (bool True = masked out, or additive) as one SDPA mask
        ``[B, H, Lq, Lk]`` (bool True = attend, or additive)."""
        extra = 1 if self.bias_k is not None else 0
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(b, self.num_heads, lq, lk - extra)
            mask = _as_additive(attn_mask, dtype)
            if extra:
                mask = F.pad(mask, (0, 1))
        if key_padding_mask is not None:
            kpm = _as_additive(key_padding_mask, dtype)
            if extra:
                kpm = F.pad(kpm, (0, 1))
            kpm = kpm.view(b, 1, 1, lk)
            mask = kpm if mask is None else mask + kpm
        return mask


def _check_mask_dtype(name: str, mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    # An integer 0/1 mask would be added to the scores as if it were a float bias.
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = masked out) or floating point (added to the "
                        f"scores), got {mask.dtype}")


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A torch-MHA mask (bool True = masked out, or additive float) as additive."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
