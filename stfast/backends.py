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
import difflib
import importlib
import json
import os
import warnings
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


def sdpa_runs_as_is(problem: Problem) -> bool:
    """Dense or causal attention without an element mask or a block layout: what
    ``F.scaled_dot_product_attention``'s flash/cuDNN kernels run on the caller's
    tensors as they are (GQA included), so the ``torch`` backend is a proven path."""
    return problem.kind == "dense" and problem.mask is None and problem.layout is None


def order(problem: Problem) -> tuple[str, ...]:
    """The order ``auto`` tries backends in for ``problem``, fastest first.

    Measured results for the device (``dispatch.json``, from ``bench/results``) decide.
    Where none exist, what SDPA runs as it is goes to ``torch`` first, and stfast's
    kernels take what SDPA cannot do without copies, padding or dense masks
    (spatio-temporal views, short packed sequences, element masks, block-sparse)."""
    measured = _measured_order(problem)
    if measured:
        return measured
    if sdpa_runs_as_is(problem):
        return ("torch",) + tuple(n for n in DEFAULT_ORDER if n != "torch")
    return DEFAULT_ORDER


def _measured_order(problem: Problem) -> tuple[str, ...] | None:
    """Backends ordered fastest first for this problem class on this device."""
    order = _dispatch_table.get(_device_name(problem.device), {}).get(problem_class(problem))
    if not order:
        return None
    return tuple(n for n in order if n in BACKEND_NAMES) + tuple(n for n in DEFAULT_ORDER if n not in order)


def env_preference() -> str:
    """``STFAST_BACKEND``, validated: ``"auto"`` when unset or empty.

    Names are exact (lower case), like the ``backend=`` argument; anything else
    raises, naming the valid values and the closest one."""
    raw = os.environ.get("STFAST_BACKEND", "")
    name = raw.strip()
    if not name:
        return "auto"
    valid = ("auto",) + BACKEND_NAMES
    if name not in valid:
        close = difflib.get_close_matches(name.lower(), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"STFAST_BACKEND must be one of {', '.join(valid)}, got {raw!r}{hint}")
    return name


def requested_name(backend: str) -> str:
    """The backend asked for: the argument, else ``use()``, else ``STFAST_BACKEND``."""
    if backend != "auto":
        return backend
    return _override[-1] if _override else env_preference()


# A wrong STFAST_BACKEND fails `import stfast`, not the first attention call.
env_preference()


def select(problem: Problem, backend: str = "auto", *, requires_grad: bool = False) -> Backend:
    """Pick the backend for ``problem``.

    An explicit ``backend=`` argument is strict: if it cannot run the problem a
    ``ValueError`` lists why.  A preference from ``use()`` or ``STFAST_BACKEND`` is
    tried first and falls through like ``auto``.  On CPU tensors ``auto`` is always
    ``torch``.
    """
    if backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    if _probe:
        _probe.append(problem)
        raise _Probed
    if backend != "auto":
        chosen = get(backend)
        reasons = _reasons(chosen, problem, requires_grad)
        if reasons:
            raise ValueError(f"backend={backend!r} cannot run this problem: " + "; ".join(reasons))
        return chosen
    preferred = requested_name("auto")
    tried = order(problem)
    if preferred != "auto":
        tried = (preferred,) + tuple(n for n in tried if n != preferred)
    for name in tried:
        candidate = get(name)
        if not _auto_reasons(candidate, problem, requires_grad):
            if preferred not in ("auto", name):
                _warn_unhonoured(preferred, _auto_reasons(get(preferred), problem, requires_grad), name)
            return candidate
    return get("torch")


def _reasons(backend: Backend, problem: Problem, requires_grad: bool) -> list[str]:
    reason = backend.unavailable_reason()
    if reason:
        return [reason]
    return backend.not_supported_reasons(problem, requires_grad=requires_grad)


def _auto_reasons(backend: Backend, problem: Problem, requires_grad: bool) -> list[str]:
    reason = backend.unavailable_reason()
    if reason:
        return [reason]
    if problem.device.type == "cpu" and backend.name != "torch":
        # The Triton interpreter is a test harness, not a CPU backend.
        return [f"auto uses only the torch backend on CPU tensors ({backend.name} runs them only "
                f"when asked for by backend={backend.name!r})"]
    return _reasons(backend, problem, requires_grad)


_warned: set = set()


def _warn_unhonoured(preferred: str, reasons: list[str], chosen: str) -> None:
    """Warn once per preferred backend and reason that the preference fell through."""
    source = "backends.use()" if _override else "STFAST_BACKEND"
    key = (preferred, reasons[0] if reasons else "")
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"{source} prefers {preferred!r}, which cannot run this call "
                  f"({'; '.join(reasons)}); using {chosen!r}. This warning is shown once per reason.",
                  RuntimeWarning, stacklevel=3)


class _Probed(Exception):
    """Raised by :func:`select` while :func:`explain` probes a public call."""


# While explain() runs a public function, select() records the lowered problem here
# and stops the call before any backend runs.
_probe: list = []

_PUBLIC = {"attention": ("causal", "layout", "return_lse", "scale", "backend"),
           "spatiotemporal_attention": ("axis", "causal", "scale", "attn_mask", "backend"),
           "scaled_dot_product_attention": ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
                                            "backend")}


def explain(*args, requires_grad: bool | None = None, **kwargs) -> dict[str, list[str]]:
    """Every backend's reasons for refusing a problem (empty list: it would run it).

    Takes a lowered :class:`~stfast.lowering.Problem`, or the arguments of a public
    function, validated and lowered exactly as that function does:
    ``explain(q, k, v, causal=True)`` (:func:`stfast.attention`),
    ``explain(q, k, v, axis="time", ...)`` (:func:`stfast.spatiotemporal_attention`),
    ``explain(q, k, v, attn_mask=m)`` / ``is_causal=`` / ``enable_gqa=`` / ``dropout_p=``
    (:func:`stfast.scaled_dot_product_attention`).  ``requires_grad`` defaults to
    whether any of q, k, v requires grad.
    """
    if len(args) == 1 and isinstance(args[0], Problem) and not kwargs:
        problem, grad = args[0], bool(requires_grad)
    else:
        problem, grad = _lower_public_call(args, kwargs)
        if requires_grad is not None:
            grad = requires_grad
    if problem is None:
        return {name: ["the call is empty (a zero-size dimension): no backend runs"] for name in BACKEND_NAMES}
    return {name: _reasons(get(name), problem, grad) for name in BACKEND_NAMES}


def _lower_public_call(args, kwargs):
    from . import functional  # lazily: functional imports this module

    if "axis" in kwargs:
        fn = "spatiotemporal_attention"
    elif {"attn_mask", "is_causal", "dropout_p", "enable_gqa"} & set(kwargs):
        fn = "scaled_dot_product_attention"
    else:
        fn = "attention"
    unknown = sorted(set(kwargs) - set(_PUBLIC[fn]))
    if unknown:
        raise TypeError(f"explain() with {fn}'s arguments got unexpected keyword arguments {unknown}; "
                        f"{fn} takes {list(_PUBLIC[fn])}")
    if len(args) != 3:
        raise TypeError(f"explain() takes a Problem or q, k, v (3 tensors), got {len(args)} positional "
                        "arguments")
    grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)
    return lower_call(lambda: getattr(functional, fn)(*args, **kwargs)), grad


def lower_call(call, *, track_grad: bool = False) -> Problem | None:
    """The :class:`Problem` a public call lowers to, validated as the call validates
    it, without running any backend (None when the call never dispatches: an empty
    problem).  ``track_grad`` keeps the problem's views in the caller's graph."""
    _probe.append(None)
    try:
        with torch.set_grad_enabled(track_grad and torch.is_grad_enabled()):
            call()
    except _Probed:
        return _probe[-1]
    finally:
        del _probe[:]
    return None
