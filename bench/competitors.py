"""Everything a case is run with: each stfast backend, and what users would otherwise
pick (SDPA with each backend forced, FlexAttention with the same block mask, the
permute + SDPA pipeline of TimeSformer / Open-Sora, dense masked SDPA, flash-attn).

Each :class:`Impl` is ``fn(q, k, v) -> out`` in the case's user layout, or a reason
why it is skipped here.  Whether it actually runs (and is right) is found out by
calling it: an unsupported call becomes an error row, never a silent omission.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import stfast
from stfast import backends

from .shapes import Case

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


@dataclass
class Impl:
    name: str
    family: str  # stfast | sdpa | flex | pipeline | flash-attn
    fn: Callable | None = None
    reason: str | None = None  # why it is skipped (fn is None)
    backend: str | None = None  # the stfast backend, for dispatch.json
    compiled: bool = False  # first call includes a compile: reported apart
    held_bytes: int = 0  # state the method keeps besides q, k, v (a dense mask): added to its peak
    no_backward: str | None = None  # why backward passes are skipped


def _forced(kernel: str | None, call: Callable) -> Callable:
    """``call`` under ``sdpa_kernel`` forcing one SDPA backend (None: PyTorch picks)."""
    if kernel is None:
        return call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[kernel])

    def run(q, k, v):
        with sdpa_kernel(backend):
            return call(q, k, v)
    return run


def _sdpa_family(prefix: str, call: Callable, device: torch.device, held_bytes: int = 0,
                 unfused: bool = True) -> list[Impl]:
    """The default SDPA dispatch (what hand-written code gets) and each backend forced.
    CUDA-only backends are skipped on CPU; the others are tried and may error."""
    impls = [Impl(prefix, "sdpa", call, held_bytes=held_bytes)]
    for kernel in SDPA_BACKENDS:
        name = f"{prefix}[{kernel}]"
        if device.type != "cuda" and kernel in ("efficient", "cudnn"):
            impls.append(Impl(name, "sdpa", reason=f"SDPA {SDPA_BACKENDS[kernel]} has no CPU kernel"))
        elif kernel == "math" and not unfused:
            impls.append(Impl(name, "sdpa", reason="left out of this preset (slow; --full runs it)"))
        else:
            impls.append(Impl(name, "sdpa", _forced(kernel, call), held_bytes=held_bytes))
    return impls


def _stfast(case: Case, layout) -> list[Impl]:
    impls = []
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for name, reason in backends.available().items():
        label = f"stfast[{name}]"
        if reason is not None:
            impls.append(Impl(label, "stfast", reason=reason, backend=name))
            continue
        if name == "triton" and interpreted:
            impls.append(Impl(label, "stfast", backend=name,
                              reason="TRITON_INTERPRET=1: the interpreter checks logic, it is not timed"))
            continue
        if case.spatiotemporal:
            fn = _bind(stfast.spatiotemporal_attention, axis=case.pclass, backend=name)
        elif layout is not None:
            fn = _bind(stfast.block_sparse_attention, layout=layout, backend=name)
        else:
            fn = _bind(stfast.attention, causal=case.pclass == "causal", backend=name)
        impls.append(Impl(label, "stfast", fn, backend=name))
    return impls


def _bind(fn, **kwargs):
    return lambda q, k, v: fn(q, k, v, **kwargs)


def _permute_pipeline(axis: str) -> Callable:
    """What TimeSformer / Open-Sora write: move the attended axis next to D, copy,
    fold the other axes into the batch, SDPA, and move it back."""
    def run(q, k, v):
        b, t, n, h, d = q.shape
        order = (0, 1, 3, 2, 4) if axis == "space" else (0, 2, 3, 1, 4)
        length = n if axis == "space" else t
        q2, k2, v2 = (x.permute(order).contiguous().view(-1, h, length, d) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q2, k2, v2)
        if axis == "space":
            return out.view(b, t, h, n, -1).permute(0, 1, 3, 2, 4)
        return out.view(b, n, h, t, -1).permute(0, 3, 1, 2, 4)
    return run


def _masked_sdpa(layout) -> Callable:
    """SDPA with the layout's dense ``[1, 1|H, L, L]`` bool mask, built on first call
    (so cases that never run it never hold an L x L tensor).  4-D, because PyTorch's
    CPU flash kernel takes no other mask shape."""
    held = {}

    def run(q, k, v):
        if "mask" not in held:
            held["mask"] = layout.to_dense_mask()[None].to(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=held["mask"])
    return run


def _flash_attn(case: Case, device: torch.device) -> Impl:
    if importlib.util.find_spec("flash_attn") is None:
        return Impl("flash-attn", "flash-attn", reason="flash-attn is not installed")
    if device.type != "cuda":
        return Impl("flash-attn", "flash-attn", reason="flash-attn needs a CUDA device")
    if case.pclass == "block_sparse":
        return Impl("flash-attn", "flash-attn", reason="flash-attn has no block-sparse layout")
    from flash_attn import flash_attn_func

    if case.spatiotemporal:
        def run(q, k, v):  # flash-attn takes [B, L, H, D]: space is a view, time a copy
            b, t, n, h, d = q.shape
            if case.pclass == "space":
                return flash_attn_func(*(x.reshape(b * t, n, h, d) for x in (q, k, v))).view(b, t, n, h, -1)
            qt, kt, vt = (x.transpose(1, 2).reshape(b * n, t, h, d) for x in (q, k, v))
            return flash_attn_func(qt, kt, vt).view(b, n, t, h, -1).transpose(1, 2)
    else:
        causal = case.pclass == "causal"

        def run(q, k, v):
            out = flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), causal=causal)
            return out.transpose(1, 2)
    return Impl("flash-attn", "flash-attn", run)


_compiled_flex = None


def _flex_attention():
    global _compiled_flex
    if _compiled_flex is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # One compile per shape and grad mode: a full sweep needs more than the default
        # limit, past which torch silently runs flex unfused.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_block_mask(layout, device: torch.device):
    """A FlexAttention ``BlockMask`` with exactly ``layout``'s blocks: its full blocks
    as full blocks, its partial blocks with their element masks."""
    from torch.nn.attention.flex_attention import BlockMask

    bt = layout.block_type.to(device)
    full, partial = bt == 1, bt == 2

    def listed(sel):
        indices = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return sel.sum(-1, dtype=torch.int32)[None], indices[None]

    block = layout.block
    masks = layout.partial_masks.to(device)
    index = layout.partial_index.to(device)
    per_head = layout.num_heads > 1
    mask_mod = None
    if bool(partial.any()):
        def mask_mod(b, h, q_idx, kv_idx):
            head = h if per_head else h * 0
            which = index[head, q_idx // block, kv_idx // block]
            return masks[which.clamp(min=0), q_idx % block, kv_idx % block] & (which >= 0)
    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(layout.seq_len_q, layout.seq_len_k))


def _flex(case: Case, layout, device: torch.device) -> Impl:
    if case.pclass == "dense" or case.spatiotemporal:
        return None
    if not case.flex:
        return Impl("flex", "flex", reason="left out of this preset (its compile is slow here)")
    try:
        if layout is not None:
            block_mask = flex_block_mask(layout, device)
        else:
            from torch.nn.attention.flex_attention import create_block_mask

            length = case.shape["L"]
            block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, length, length,
                                           device=device)
    except Exception as exc:  # an unsupported torch build is a result to report
        return Impl("flex", "flex", reason=f"block mask: {type(exc).__name__}: {exc}")
    flex = _flex_attention()
    # torch raises NotImplementedError for a CPU backward, and after that failed compile
    # the next compiled flex call (another block mask) returns wrong values (torch
    # 2.13; the guard caught it): so on CPU the backward is not even tried.
    no_backward = ("FlexAttention has no backward on CPU (NotImplementedError); not called, since "
                   "the failed compile corrupts later compiled flex calls") if device.type == "cpu" else None
    return Impl("flex", "flex", lambda q, k, v: flex(q, k, v, block_mask=block_mask), compiled=True,
                no_backward=no_backward)


def competitors(case: Case, device: torch.device) -> list[Impl]:
    """Every implementation of ``case`` this run compares, skipped ones included."""
    layout = case.build_layout()
    impls = _stfast(case, layout)
    if case.spatiotemporal:
        impls.append(Impl("permute+sdpa", "pipeline", _permute_pipeline(case.pclass)))
    elif layout is not None:
        impls += _sdpa_family("sdpa+mask", _masked_sdpa(layout), device,
                              held_bytes=layout.num_heads * layout.seq_len_q * layout.seq_len_k,
                              unfused=case.unfused)
    else:
        causal = case.pclass == "causal"
        impls += _sdpa_family("sdpa", lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal), device, unfused=case.unfused)
    flex = _flex(case, layout, device)
    if flex is not None:
        impls.append(flex)
    impls.append(_flash_attn(case, device))
    return impls
