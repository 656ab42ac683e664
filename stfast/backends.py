"""Backend registry: interchangeable implementations of the one lowered problem.

Each backend says why it cannot run here (``unavailable_reason``) and why it cannot
take a given problem (``not_supported_reasons``); ``auto`` picks the first backend
of the preference order with no reasons, so anything a kernel cannot do goes to the
``torch`` fallback, never to a wrong answer.

Two kinds of backend share the interface:

* ``differentiable`` backends (``torch``) return outputs that autograd already
  tracks: ``run(problem, need_lse) -> (out_user, lse5 | None)``.
* kernel backends (``triton``, ``cuda``) fill buffers and are wrapped by the custom
  op in :mod:`stfast.autograd`:
  ``forward(problem, out5, lse5)`` and
  ``backward(problem, out5, dout5, lse5, dq5, dk5, dv5)``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path

import torch

from .lowering import Problem

BACKEND_NAMES = ("torch", "triton", "cuda")
DEFAULT_ORDER = ("triton", "cuda", "torch")
DISPATCH_TABLE = Path(__file__).with_name("dispatch.json")

# Where each backend lives; imported on first use so `import stfast` never needs
# Triton, nvcc or a GPU.
_MODULES = {"torch": "stfast.torch_backend", "triton": "stfast.triton", "cuda": "stfast.cuda"}
_instances: dict = {}
# Innermost `use()` last.  A plain list (not a ContextVar) so torch.compile can trace
# the dispatch decision instead of breaking the graph on it.
_override: list[str] = []


class Backend:
    """Interface of a backend.  Subclasses set ``name`` and ``differentiable``."""

    name = "?"
    differentiable = False

    def unavailable_reason(self) -> str | None:
        return None

    def not_supported_reasons(self, problem: Problem, *, requires_grad: bool = False) -> list[str]:
        return []

    def run(self, problem: Problem, need_lse: bool):
        raise NotImplementedError

    def forward(self, problem: Problem, out5: torch.Tensor, lse5: torch.Tensor) -> None:
        raise NotImplementedError

    def backward(self, problem: Problem, out5, dout5, lse5, dq5, dk5, dv5) -> None:
        raise NotImplementedError


class _Unloadable(Backend):
    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable_reason(self) -> str | None:
        return self._reason


def get(name: str) -> Backend:
    """The backend object called ``name`` (loaded on first use)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    if name not in _instances:
        try:
            _instances[name] = importlib.import_module(_MODULES[name]).BACKEND
        except Exception as exc:  # a missing optional dependency must not break stfast
            _instances[name] = _Unloadable(name, f"could not be imported: {type(exc).__name__}: {exc}")
    return _instances[name]


def available() -> dict[str, str | None]:
    """``{name: None}`` for each backend that can run here, else the reason it cannot."""
    return {name: get(name).unavailable_reason() for name in BACKEND_NAMES}


@contextlib.contextmanager
def use(name: str):
    """Prefer backend ``name`` inside the block (``"auto"`` restores the default)."""
    if name != "auto":
        get(name)
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def problem_class(problem: Problem) -> str:
    """The class of a problem that benchmark results are kept for."""
    if problem.layout is not None:
        return "block_sparse"
    if problem.kind != "dense":
        return problem.kind
    return "causal" if problem.causal else "dense"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def load_dispatch_table(path: Path = DISPATCH_TABLE) -> dict:
    """``{device name: {problem class: [backends, fastest first]}}`` as measured by
    ``python -m bench --update-dispatch``; empty when there is none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# Read once at import, so dispatch under torch.compile does no file I/O.
_dispatch_table = load_dispatch_table()


def _measured_order(problem: Problem) -> tuple[str, ...] | None:
    """Backends ordered fastest first for this problem class on this device."""
    order = _dispatch_table.get(_device_name(problem.device), {}).get(problem_class(problem))
    if not order:
        return None
    return tuple(n for n in order if n in BACKEND_NAMES) + tuple(n for n in DEFAULT_ORDER if n not in order)


def requested_name(backend: str) -> str:
    """The backend asked for: the argument, else ``use()``, else ``STFAST_BACKEND``."""
    if backend != "auto":
        return backend
    name = _override[-1] if _override else os.environ.get("STFAST_BACKEND", "auto")
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"STFAST_BACKEND must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    return name


def select(problem: Problem, backend: str = "auto", *, requires_grad: bool = False) -> Backend:
    """Pick the backend for ``problem``.

    An explicit ``backend=`` argument is strict: if it cannot run the problem a
    ``ValueError`` lists why.  A preference from ``use()`` or ``STFAST_BACKEND`` is
    tried first and falls through like ``auto``.  On CPU tensors ``auto`` is always
    ``torch``.
    """
    if backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    if backend != "auto":
        chosen = get(backend)
        reasons = _reasons(chosen, problem, requires_grad)
        if reasons:
            raise ValueError(f"backend={backend!r} cannot run this problem: " + "; ".join(reasons))
        return chosen
    preferred = requested_name("auto")
    order = _measured_order(problem) or DEFAULT_ORDER
    if preferred != "auto":
        order = (preferred,) + tuple(n for n in order if n != preferred)
    for name in order:
        if problem.device.type == "cpu" and name != "torch":
            continue  # the Triton interpreter is a test harness, not a CPU backend
        candidate = get(name)
        if not _reasons(candidate, problem, requires_grad):
            return candidate
    return get("torch")


def _reasons(backend: Backend, problem: Problem, requires_grad: bool) -> list[str]:
    reason = backend.unavailable_reason()
    if reason:
        return [reason]
    return backend.not_supported_reasons(problem, requires_grad=requires_grad)


def explain(problem: Problem, *, requires_grad: bool = False) -> dict[str, list[str]]:
    """Every backend's reasons for refusing ``problem`` (empty list: it would run it)."""
    return {name: _reasons(get(name), problem, requires_grad) for name in BACKEND_NAMES}
