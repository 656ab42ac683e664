"""Sequence parallelism for :class:`stfast.SpatioTemporalAttention` over ``torch.distributed``.

Each rank of a process group holds a contiguous chunk of frames of ``x: [B, T, N, C]``
(sharded along T) and gets back its chunk of the output.  Frames may be split unevenly:
the layer learns every rank's frame count from a small ``all_gather`` of shard shapes
(which also checks that B, N, C and the dtype agree; one tiny collective and, on
NCCL, one host sync per forward), so any contiguous split in rank order works.
:func:`shard` / :func:`gather` use the ``torch.tensor_split`` convention (the first
``T % world`` ranks get one frame more).

Two strategies, both on PyTorch's own collectives (NCCL on GPU, gloo on CPU):

``strategy="dsp"`` (Dynamic Sequence Parallelism, Zhao et al. 2024)
    A space pass is local: every frame lives on one rank.  Before a time pass the
    activation is resharded from T to N with one all-to-all, the whole temporal block
    (qkv projection, attention, output projection) runs on the rank's tokens over all T
    frames, and one all-to-all reshards back to T.

``strategy="ulysses"`` (DeepSpeed-Ulysses)
    Every attention, space or time, all-to-alls q, k, v (one fused call) from
    sequence- to head-sharding, attends over the full sequence with its share of the
    heads, and all-to-alls the output back.

So DSP pays 2 all-to-alls of the activation per time pass and none per space pass;
Ulysses pays 4 (q, k, v, output) per attention.  Communication per layer and per rank,
with ``M = B*T*N*C`` activation elements over ``P`` ranks (what each rank passes to the
all-to-alls; ``(P-1)/P`` of it leaves the rank):

    ========== ========= ==========
    mode       dsp       ulysses
    ========== ========= ==========
    space      0         4 M/P
    time       2 M/P     4 M/P
    divided    2 M/P     8 M/P
    gated      2 M/P     8 M/P
    heads      1.5 M/P   4 M/P
    ========== ========= ==========

The backward pass moves the same volume again (each all-to-all's backward is the
reverse all-to-all).  In ``heads`` mode DSP reshards ``x`` and projects q, k, v of the
temporal heads on the token shard, so only ``x`` (``C``) goes out and the temporal
half of the output (``C/2``) comes back.  :func:`count_comm` measures these numbers.

Uneven shapes need no padding: the all-to-alls use per-rank split sizes, so every
attention sees exactly the real frames and tokens.  World sizes a layer cannot use
raise ``ValueError``: every rank must hold at least one frame (``T >= P``); DSP needs
``N >= P`` when the mode has a time pass (it shards tokens); Ulysses needs at least
``P`` heads per attention (``num_heads``, or ``num_heads // 2`` in ``heads`` mode;
uneven head counts are split like frames).  ``mode="joint"`` is refused: it attends
over all T*N tokens at once, so no resharding makes it local.

Training: input gradients come back sharded like the input.  Parameter gradients on a
rank are that rank's share; wrap the model in ``DistributedDataParallel`` over all ranks
(data x sequence), which averages them: with each rank's loss a mean over its own
tokens (even shards) that is the gradient of the global mean loss.  Pass the sequence
group (e.g. ``init_device_mesh(..., mesh_dim_names=("dp", "sp"))["sp"].get_group()``)
as ``process_group`` to combine data and sequence parallelism.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import functional
from .modules import SpatioTemporalAttention, _check_input

__all__ = ["SequenceParallelSpatioTemporalAttention", "shard", "gather", "count_comm", "CommCount"]

MODES = ("space", "time", "divided", "heads", "gated")
STRATEGIES = ("dsp", "ulysses")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class CommCount:
    """Bytes this process passed to collectives (send buffers), and how many calls."""

    all_to_all_bytes: int = 0
    all_to_all_remote_bytes: int = 0  # the part addressed to other ranks
    all_to_all_calls: int = 0
    all_gather_bytes: int = 0
    all_gather_calls: int = 0


_counters: list[CommCount] = []


@contextlib.contextmanager
def count_comm():
    """Counts what this process passes to the collectives of this module inside the
    block (forward and backward alike)::

        with stfast.distributed.count_comm() as c:
            y = layer(x)
        c.all_to_all_bytes
    """
    counter = CommCount()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _record_all_to_all(send: torch.Tensor, remote_elements: int) -> None:
    for c in _counters:
        c.all_to_all_bytes += send.numel() * send.element_size()
        c.all_to_all_remote_bytes += remote_elements * send.element_size()
        c.all_to_all_calls += 1


def _record_all_gather(send: torch.Tensor) -> None:
    for c in _counters:
        c.all_gather_bytes += send.numel() * send.element_size()
        c.all_gather_calls += 1


def _resolve_group(group):
    """``(group, rank, world)``; errors if there is no usable process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group(...) (or launch with torchrun) "
                           "before running a sequence-parallel layer")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"this process (global rank {dist.get_rank()}) is not a member of "
                           f"process_group {group!r}")
    return group, rank, dist.get_world_size(group)


def _split_sizes(length: int, world: int) -> list[int]:
    """The ``torch.tensor_split`` split of ``length`` items over ``world`` ranks."""
    return [length // world + (1 if r < length % world else 0) for r in range(world)]


def _all_to_all(x, group, rank, send_dim, send_sizes, recv_dim, recv_sizes):
    """Chunk ``s`` of ``x`` along ``send_dim`` goes to rank ``s``; the chunks received
    from every rank are concatenated along ``recv_dim`` (rank ``s`` sends
    ``recv_sizes[s]`` along it)."""
    if x.shape[send_dim] != sum(send_sizes) or x.shape[recv_dim] != recv_sizes[rank]:
        raise RuntimeError(f"internal: all-to-all of shape {tuple(x.shape)} with send sizes "
                           f"{send_sizes} on dim {send_dim}, receive sizes {recv_sizes} on dim {recv_dim}")
    chunks = x.split(send_sizes, send_dim)
    send = torch.cat([c.reshape(-1) for c in chunks])
    recv_shapes = []
    for size in recv_sizes:
        shape = list(x.shape)
        shape[send_dim], shape[recv_dim] = send_sizes[rank], size
        recv_shapes.append(shape)
    recv_numels = [math.prod(s) for s in recv_shapes]
    recv = send.new_empty(sum(recv_numels))
    send_numels = [c.numel() for c in chunks]
    _record_all_to_all(send, send.numel() - send_numels[rank])
    dist.all_to_all_single(recv, send, recv_numels, send_numels, group=group)
    return torch.cat([r.view(s) for r, s in zip(recv.split(recv_numels), recv_shapes)], dim=recv_dim)


class _AllToAll(torch.autograd.Function):
    """Reshards a tensor between two dims; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, rank, send_dim, send_sizes, recv_dim, recv_sizes):
        ctx.args = (group, rank, send_dim, send_sizes, recv_dim, recv_sizes)
        return _all_to_all(x, group, rank, send_dim, send_sizes, recv_dim, recv_sizes)

    @staticmethod
    def backward(ctx, grad):
        group, rank, send_dim, send_sizes, recv_dim, recv_sizes = ctx.args
        return (_AllToAll.apply(grad, group, rank, recv_dim, recv_sizes, send_dim, send_sizes),
                None, None, None, None, None, None)


def _all_gather_uneven(x, dim, sizes, group):
    """Concatenation along ``dim`` of every rank's ``x`` (rank ``s`` holds ``sizes[s]``)."""
    longest = max(sizes)
    padded = x
    if x.shape[dim] < longest:
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim)
    padded = padded.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    _record_all_gather(padded)
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, rank, world):
        ctx.args = (dim, group, _split_sizes(x.shape[dim], world))
        return x.tensor_split(world, dim)[rank].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        dim, group, sizes = ctx.args
        return _all_gather_uneven(grad, dim, sizes, group), None, None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, rank, sizes):
        ctx.args = (dim, rank, sizes)
        return _all_gather_uneven(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        dim, rank, sizes = ctx.args
        return grad.split(sizes, dim)[rank].contiguous(), None, None, None, None


def shard(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """This rank's chunk of ``x`` (the same full tensor on every rank) along ``dim``,
    split like ``torch.tensor_split``: the first ``size % world`` ranks get one more.

    Autograd: the gradient of ``x`` is the all-gather of the chunks' gradients, so a
    replicated ``x`` gets the full gradient on every rank.
    """
    group, rank, world = _resolve_group(group)
    dim = _check_dim(x, dim)
    return _Shard.apply(x, dim, group, rank, world)


def gather(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """The full tensor from every rank's chunk along ``dim`` (chunks in rank order, of any
    sizes; the other dims must agree).  Autograd: each rank keeps its chunk of the
    gradient, which suits a loss computed identically on every rank."""
    group, rank, world = _resolve_group(group)
    dim = _check_dim(x, dim)
    shapes = _gather_ints(list(x.shape), x.device, group, world)
    for s, shape in enumerate(shapes):
        other, mine = shape[:dim] + shape[dim + 1:], list(x.shape[:dim] + x.shape[dim + 1:])
        if other != mine:
            raise ValueError(f"x must have the same shape on every rank except along dim {dim}: "
                             f"rank {s} has {shape}, rank {rank} has {list(x.shape)}")
    return _Gather.apply(x, dim, group, rank, [shape[dim] for shape in shapes])


def _check_dim(x, dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    return dim % x.dim()


def _gather_ints(values: list[int], device, group, world) -> list[list[int]]:
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    _record_all_gather(mine)
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).tolist()


class _GroupRef:
    """Holds a process group so that ``copy.deepcopy`` of a model (EMA copies) shares it
    instead of failing: a group is a handle to communicators, not state to copy."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


@dataclass
class _Shards:
    group: object
    rank: int
    world: int
    frames: list[int]  # frames held by each rank
    tokens: list[int]  # tokens held by each rank while sharded along N

    def to_tokens(self, x):
        """``[B, T_r, N, ...]`` -> ``[B, T, N_r, ...]``."""
        return _AllToAll.apply(x, self.group, self.rank, 2, self.tokens, 1, self.frames)

    def to_frames(self, x):
        """``[B, T, N_r, ...]`` -> ``[B, T_r, N, ...]``."""
        return _AllToAll.apply(x, self.group, self.rank, 1, self.frames, 2, self.tokens)

    def to_heads(self, x, head_dim, heads):
        """``[B, T_r, ..., H, ...]`` -> ``[B, T, ..., H_r, ...]``."""
        sizes = _split_sizes(heads, self.world)
        return _AllToAll.apply(x, self.group, self.rank, head_dim, sizes, 1, self.frames)

    def from_heads(self, x, head_dim, heads):
        sizes = _split_sizes(heads, self.world)
        return _AllToAll.apply(x, self.group, self.rank, 1, self.frames, head_dim, sizes)


class SequenceParallelSpatioTemporalAttention(SpatioTemporalAttention):
    """:class:`stfast.SpatioTemporalAttention` over frames sharded across a process group.

    Same parameters and ``state_dict`` as ``SpatioTemporalAttention(dim, num_heads,
    mode=mode, causal_time=causal_time, qkv_bias=qkv_bias)``; ``forward(x, spatial_mask)``
    takes this rank's frames ``[B, T_r, N, C]`` and returns this rank's output frames.
    ``process_group``: the sequence-parallel group (default: the whole world).
    ``strategy``: ``"dsp"`` or ``"ulysses"`` (see the module docstring for their
    communication volumes and the world sizes each can use).
    """

    def __init__(self, dim: int, num_heads: int, *, mode: str = "divided", causal_time: bool = False,
                 qkv_bias: bool = True, process_group=None, strategy: str = "dsp",
                 backend: str = "auto"):
        if mode == "joint":
            raise ValueError("mode='joint' cannot be sequence-parallel here: it attends over all "
                             "T*N tokens at once, so no resharding makes it local; use one of "
                             f"{MODES}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        super().__init__(dim, num_heads, mode=mode, causal_time=causal_time, qkv_bias=qkv_bias,
                         backend=backend)
        self._group_ref = _GroupRef(process_group)
        self.strategy = strategy

    @property
    def process_group(self):
        return self._group_ref.group

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, strategy={self.strategy!r}"

    def forward(self, x: torch.Tensor, spatial_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_input(x, 4, self.dim, "[B, T_local, N, C]")
        if spatial_mask is not None and self.mode == "time":
            raise ValueError("spatial_mask is not supported with mode='time'")
        sh = self._shards(x)
        space = dict(attn_mask=spatial_mask, backend=self.backend)
        time = dict(causal=self.causal_time, backend=self.backend)
        if self.mode == "space":
            return self._attend(self.attn, x, "space", sh, space)
        if self.mode == "time":
            return self._attend(self.attn, x, "time", sh, time)
        if self.mode == "divided":
            return self._attend(self.spatial, self._attend(self.temporal, x, "time", sh, time),
                                "space", sh, space)
        if self.mode == "gated":
            hs = self._attend(self.spatial, x, "space", sh, space)
            ht = self._attend(self.temporal, x, "time", sh, time)
            z = torch.sigmoid(self.gate_space(hs) + self.gate_time(ht))
            return z * hs + (1 - z) * ht
        if self.strategy == "dsp":
            return self._heads_dsp(x, sh, space, time)
        return self._heads_ulysses(x, sh, space, time)

    def _shards(self, x) -> _Shards:
        group, rank, world = _resolve_group(self.process_group)
        if x.dtype not in _DTYPES:
            raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
        shapes = _gather_ints([*x.shape, _DTYPES.index(x.dtype)], x.device, group, world)
        for s, shape in enumerate(shapes):
            if shape[0] != shapes[0][0] or shape[2:4] != shapes[0][2:4]:
                raise ValueError(f"every rank's shard must have the same B, N and C: rank {s} has "
                                 f"[B, T_local, N, C] = {shape[:4]}, rank 0 has {shapes[0][:4]}")
            if shape[4] != shapes[0][4]:
                raise TypeError(f"every rank's shard must have the same dtype: rank {s} has "
                                f"{_DTYPES[shape[4]]}, rank 0 has {_DTYPES[shapes[0][4]]}")
        frames = [shape[1] for shape in shapes]
        n = x.shape[2]
        if min(frames) < 1:
            raise ValueError(f"every rank must hold at least one frame (T >= world size {world}): "
                             f"frames per rank = {frames}")
        if self.strategy == "dsp" and self.mode != "space" and n < world:
            raise ValueError(f"strategy='dsp' shards the N tokens over the ranks for the time pass: "
                             f"N must be >= world size {world}, got N={n}")
        heads = self.num_heads // 2 if self.mode == "heads" else self.num_heads
        if self.strategy == "ulysses" and heads < world:
            raise ValueError(f"strategy='ulysses' shards each attention's heads over the ranks: "
                             f"mode={self.mode!r} with num_heads={self.num_heads} has {heads} heads "
                             f"per attention, fewer than world size {world}")
        return _Shards(group, rank, world, frames, _split_sizes(n, world))

    def _attend(self, attn, x, axis, sh: _Shards, kwargs):
        """``attn`` (an ``_AxisAttention``) along ``axis`` on frame-sharded ``x``."""
        if self.strategy == "dsp":
            if axis == "space":
                return attn(x, "space", **kwargs)
            return sh.to_frames(attn(sh.to_tokens(x), "time", **kwargs))
        b, t, n, c = x.shape
        qkv = sh.to_heads(attn.qkv(x).view(b, t, n, 3, self.num_heads, self.head_dim), 4, self.num_heads)
        out = functional.spatiotemporal_attention(*qkv.unbind(3), axis=axis, **kwargs)
        return attn.proj(sh.from_heads(out, 3, self.num_heads).reshape(x.shape))

    def _heads_dsp(self, x, sh: _Shards, space, time):
        """Space heads on the frame shard; the time heads' q, k, v are projected from ``x``
        resharded to tokens, so only ``x`` and the time half of the output travel."""
        half, d, c = self.num_heads // 2, self.head_dim, self.dim
        weight = self.attn.qkv.weight.view(3, 2, half * d, c)
        bias = self.attn.qkv.bias
        bias = None if bias is None else bias.view(3, 2, half * d)

        def qkv(inp, which):
            w = weight[:, which].reshape(3 * half * d, c)
            b = None if bias is None else bias[:, which].reshape(-1)
            return F.linear(inp, w, b).view(*inp.shape[:3], 3, half, d).unbind(3)

        out_space = functional.spatiotemporal_attention(*qkv(x, 0), axis="space", **space)
        out_time = functional.spatiotemporal_attention(*qkv(sh.to_tokens(x), 1), axis="time", **time)
        out = torch.cat([out_space, sh.to_frames(out_time)], dim=3)
        return self.attn.proj(out.reshape(x.shape))

    def _heads_ulysses(self, x, sh: _Shards, space, time):
        b, t, n, c = x.shape
        half = self.num_heads // 2
        qkv = self.attn.qkv(x).view(b, t, n, 3, 2, half, self.head_dim)
        q, k, v = sh.to_heads(qkv, 5, half).unbind(3)
        out_space = functional.spatiotemporal_attention(q[:, :, :, 0], k[:, :, :, 0], v[:, :, :, 0],
                                                        axis="space", **space)
        out_time = functional.spatiotemporal_attention(q[:, :, :, 1], k[:, :, :, 1], v[:, :, :, 1],
                                                       axis="time", **time)
        out = sh.from_heads(torch.stack([out_space, out_time], dim=3), 4, half)
        return self.attn.proj(out.reshape(x.shape))
