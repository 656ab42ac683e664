"""The one problem description that every backend consumes.

Every public call (dense SDPA-style, causal, spatio-temporal along either axis,
block-sparse) is lowered to a :class:`Problem`: q, k, v as 5-D *views*
``[B0, B1, B2, L, D]`` of the caller's memory (three batch indices, one sequence
index, a contiguous last dimension) plus a block schedule.  Lowering never copies:
``[B,H,L,D]``, ``[B,L,H,D]``, fused-qkv slices and both axes of ``[B,T,N,H,D]`` are
only different strides of the same five indices.

GQA is strides too: query heads ``Hq = Hkv * G`` are split into ``(Hkv, G)`` batch
indices and k/v are expanded with stride 0 along ``G``.  A stride 0 alone does not
make dk/dv sums: a caller may pass k/v ``expand``ed over heads, so a kernel sums dk/dv
over ``B2`` only when its gradient buffers are shared along ``B2`` too
(:meth:`Problem.new_grads` keeps that stride 0 for GQA only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("dense", "space", "time")
CAUSAL_MODES = (None, "top_left", "bottom_right")


@dataclass(frozen=True)
class LoweredLayout:
    """A block schedule on one device.

    ``block_type[h, i, j]`` is 0 (skipped), 1 (full) or 2 (partial: apply
    ``partial_masks[partial_index[h, i, j]]``, a ``[block, block]`` bool mask).
    ``kv_indices[h, i, :kv_counts[h, i]]`` are the active key blocks of query block
    ``i`` in ascending order; ``q_indices``/``q_counts`` are the transpose used by the
    dk/dv pass.  The layout head of batch element ``(b0, b1, b2)`` is
    ``b0*head_strides[0] + b1*head_strides[1] + b2*head_strides[2]``.
    """

    block: int
    block_type: torch.Tensor
    partial_index: torch.Tensor
    partial_masks: torch.Tensor
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    q_counts: torch.Tensor
    q_indices: torch.Tensor
    head_strides: tuple[int, int, int]
    # Active key blocks of each query block, the max over layout heads, as Python ints
    # so the torch backend can plan its chunks without a device sync.  Empty inside
    # the kernel custom ops, whose kernels read kv_counts.
    row_counts: tuple[int, ...] = ()

    @staticmethod
    def build(block: int, block_type: torch.Tensor, partial_index: torch.Tensor,
              partial_masks: torch.Tensor, head_strides: tuple[int, int, int],
              row_counts: tuple[int, ...]) -> "LoweredLayout":
        active = block_type > 0
        # A stable sort of "inactive" flags puts the active block indices first, ascending.
        kv_indices = torch.sort((~active).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        q_indices = torch.sort((~active).transpose(1, 2).to(torch.int8), dim=-1,
                               stable=True).indices.to(torch.int32)
        return LoweredLayout(
            block=block, block_type=block_type, partial_index=partial_index,
            partial_masks=partial_masks,
            kv_counts=active.sum(-1, dtype=torch.int32), kv_indices=kv_indices.contiguous(),
            q_counts=active.sum(-2, dtype=torch.int32), q_indices=q_indices.contiguous(),
            head_strides=head_strides, row_counts=row_counts)

    def tables(self) -> list[torch.Tensor]:
        """The tensors of the schedule, in the order :meth:`from_tables` takes them."""
        return [self.block_type, self.partial_index, self.partial_masks, self.kv_counts,
                self.kv_indices, self.q_counts, self.q_indices]

    @staticmethod
    def from_tables(tables, block: int, head_strides) -> "LoweredLayout":
        bt, pi, pm, kc, ki, qc, qi = tables
        return LoweredLayout(block=block, block_type=bt, partial_index=pi, partial_masks=pm,
                             kv_counts=kc, kv_indices=ki, q_counts=qc, q_indices=qi,
                             head_strides=tuple(head_strides))

    def head_index(self, batch: tuple[int, int, int], device) -> torch.Tensor:
        """Layout head of every batch element, as a ``[B0, B1, B2]`` int64 tensor."""
        idx = torch.zeros(batch, dtype=torch.int64, device=device)
        for dim, (size, stride) in enumerate(zip(batch, self.head_strides)):
            if stride:
                shape = [1, 1, 1]
                shape[dim] = size
                idx = idx + torch.arange(size, device=device).view(shape) * stride
        return idx


def to5(t: torch.Tensor, kind: str, groups: int = 1, shared: bool = False) -> torch.Tensor:
    """The 5-D view ``[B0, B1, B2, L, D]`` of a user tensor, without copying.

    dense: ``[B, H, L, D]`` -> ``[B, H/groups, groups, L, D]`` (``shared``: k/v of GQA,
    ``[B, Hkv, L, D]`` expanded with stride 0 over the group).
    space: ``[B, T, N, H, D]`` -> ``[B, T, H, N, D]``.  time: -> ``[B, N, H, T, D]``.
    """
    if kind == "dense":
        if shared:
            return t.unsqueeze(2).expand(-1, -1, groups, -1, -1)
        return t.unflatten(1, (t.shape[1] // groups, groups))
    if kind == "space":
        return t.permute(0, 1, 3, 2, 4)
    if kind == "time":
        return t.permute(0, 2, 3, 1, 4)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def from5(t5: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of :func:`to5` for an output laid out like q (a view, no copy)."""
    if kind == "dense":
        return t5.flatten(1, 2)
    if kind == "space":
        return t5.permute(0, 1, 3, 2, 4)
    if kind == "time":
        return t5.permute(0, 3, 1, 2, 4)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


@dataclass
class Problem:
    """One attention problem: strided 5-D views plus a schedule.

    ``mask`` is ``None`` or a ``[B0, B1, B2, Lq, Lk]`` (possibly stride-0 expanded)
    view: bool (True = attend) or floating (added to the scaled scores).
    ``causal`` is ``None``, ``"top_left"`` (query i sees keys j <= i) or
    ``"bottom_right"`` (query i sees keys j <= i + Lk - Lq).
    """

    kind: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    causal: str | None = None
    mask: torch.Tensor | None = None
    layout: LoweredLayout | None = None
    groups: int = 1  # GQA group size (dense only): query heads per kv head

    @property
    def batch(self) -> tuple[int, int, int]:
        return tuple(self.q.shape[:3])

    @property
    def lq(self) -> int:
        return self.q.shape[3]

    @property
    def lk(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.q.shape[4]

    @property
    def v_dim(self) -> int:
        return self.v.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def user_out_shape(self) -> list[int]:
        """Shape of the user-facing output (laid out like q, last dim Dv)."""
        shape = list(from5(self.q, self.kind).shape)
        shape[-1] = self.v_dim
        return shape

    def new_output(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh contiguous output in the user's layout, and its 5-D view."""
        out = torch.empty(self.user_out_shape(), dtype=self.dtype, device=self.device)
        return out, to5(out, self.kind, self.groups)

    def new_lse(self) -> torch.Tensor:
        """A fresh float32 ``[B0, B1, B2, Lq]`` log-sum-exp buffer."""
        return torch.empty(*self.batch, self.lq, dtype=torch.float32, device=self.device)

    def new_grads(self, q_user: torch.Tensor, k_user: torch.Tensor, v_user: torch.Tensor):
        """Fresh dq, dk, dv in the users' shapes, and their 5-D views.

        dk/dv views of GQA problems keep stride 0 along B2: write each kv head once.
        """
        grads = []
        for t, shared in ((q_user, False), (k_user, True), (v_user, True)):
            g = torch.empty(t.shape, dtype=t.dtype, device=t.device)
            grads.append((g, to5(g, self.kind, self.groups, shared=shared and self.kind == "dense")))
        return grads


def lower(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
          causal: str | None = None, mask: torch.Tensor | None = None,
          layout: LoweredLayout | None = None) -> Problem:
    """Lower validated user tensors to a :class:`Problem` (views only, no copies).

    ``mask`` is already broadcast to the attention shape of the call: dense
    ``[B, Hq, Lq, Lk]``, spatio-temporal ``[L, L]`` (expanded over the batch here).
    """
    groups = q.shape[1] // k.shape[1] if kind == "dense" else 1
    q5 = to5(q, kind, groups)
    k5 = to5(k, kind, groups, shared=kind == "dense")
    v5 = to5(v, kind, groups, shared=kind == "dense")
    mask5 = None
    if mask is not None:
        if kind == "dense":
            mask5 = mask.unflatten(1, (q.shape[1] // groups, groups))
        else:
            mask5 = mask.expand(*q5.shape[:3], *mask.shape[-2:])
    return Problem(kind=kind, q=q5, k=k5, v=v5, scale=scale, causal=causal, mask=mask5,
                   layout=layout, groups=groups)
