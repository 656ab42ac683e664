"""The ``triton`` backend: fused flash-attention kernels for every lowered problem.

Importing this package never needs a GPU: Triton itself is imported lazily, and a
missing or unusable Triton becomes an :meth:`unavailable_reason`.
"""

from __future__ import annotations

import os

import torch

from ..backends import Backend
from ..lowering import Problem

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    differentiable = False

    def __init__(self):
        self._launch = None
        self._import_error = None

    def _launcher(self):
        if self._launch is None and self._import_error is None:
            try:
                from . import launch
            except Exception as exc:  # an unusable Triton must not break stfast
                self._import_error = f"{type(exc).__name__}: {exc}"
            else:
                self._launch = launch
        return self._launch

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return f"triton is not installed or failed to import ({type(exc).__name__}: {exc})"
        if not torch.cuda.is_available() and not _interpret():
            return "no CUDA device and TRITON_INTERPRET is not 1"
        if self._launcher() is None:
            return f"the triton kernels failed to load: {self._import_error}"
        return None

    def not_supported_reasons(self, problem: Problem, *, requires_grad: bool = False) -> list[str]:
        p = problem
        reasons = []
        if p.dtype not in _DTYPES:
            reasons.append(f"dtype must be float16, bfloat16 or float32, got {p.dtype}")
        if p.device.type != "cuda" and not _interpret():
            reasons.append(f"tensors must be on a CUDA device (or TRITON_INTERPRET=1), got {p.device}")
        if p.device.type == "cuda" and _interpret():
            reasons.append("TRITON_INTERPRET=1 runs kernels on the CPU: tensors must be on the CPU")
        for name, t in (("q", p.q), ("k", p.k), ("v", p.v)):
            if t.shape[-1] > 1 and t.stride(-1) != 1:
                reasons.append(f"{name} must have a contiguous last dim (stride 1), got stride {t.stride(-1)}")
        if p.head_dim > MAX_HEAD_DIM or p.v_dim > MAX_HEAD_DIM:
            reasons.append(f"head dims must be <= {MAX_HEAD_DIM}, got D={p.head_dim}, Dv={p.v_dim}")
        if p.layout is not None:
            b = p.layout.block
            if b < 16 or b & (b - 1):
                reasons.append(f"layout block must be a power of two >= 16, got {b}")
        if p.mask is not None and p.mask.dtype != torch.bool and not p.mask.is_floating_point():
            reasons.append(f"mask must be bool or floating point, got {p.mask.dtype}")
        if max(p.lq, p.lk) > 16 * 65535:
            reasons.append(f"sequence lengths must be <= {16 * 65535}, got Lq={p.lq}, Lk={p.lk}")
        launch = self._launcher()
        if launch is not None and not reasons:
            reasons += launch.resource_reasons(p, requires_grad, launch.device_target(p.device))
        return reasons

    def forward(self, problem: Problem, out5: torch.Tensor, lse5: torch.Tensor) -> None:
        self._launcher().forward(problem, out5, lse5)

    def backward(self, problem: Problem, out5, dout5, lse5, dq5, dk5, dv5) -> None:
        self._launcher().backward(problem, out5, dout5, lse5, dq5, dk5, dv5)


BACKEND = TritonBackend()
