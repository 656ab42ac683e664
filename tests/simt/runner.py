"""Runs csrc/ kernels under the emulator: the ``cuda`` backend with its library swapped
for the emulated build, every tensor copied into guarded memory for the call, one of
three schedules per backend instance, and an emulator report raised as ``SimtError``
with the kernel source lines (addr2line) of the offending operation."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import shutil
import subprocess
from pathlib import Path

import torch

import stfast.cuda as scuda

from . import build as simt_build

# The cp.async landing schedule; each also fixes the fiber and block order:
# at the covering wait_group + forward order, at issue + reversed, random + random.
SCHEDULES = {"wait": 0, "issue": 1, "random": 2}
H100_SMEM_OPTIN = 232448


class SimtError(RuntimeError):
    """The emulator stopped a launch: a race, bounds, alignment, divergence or deadlock."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


def _lines(location: str) -> str:
    """'kernel.cuh:123 (fn) <- ...' for 'object.so+0xoffset', via addr2line's inline chain."""
    if not location or shutil.which("addr2line") is None:
        return location
    obj, _, offset = location.rpartition("+")
    proc = subprocess.run(["addr2line", "-i", "-f", "-C", "-e", obj, offset], capture_output=True, text=True)
    out = proc.stdout.split("\n")
    frames = []
    for fn, line in zip(out[0::2], out[1::2]):
        frames.append(f"{Path(line.split(' ')[0]).name} ({fn.split('(')[0]})")
    return " <- ".join(frames) or location


class Emulator:
    """One emulated build of a csrc/ tree: the runtime, the binding and its kernel units."""

    def __init__(self, root: Path = simt_build.CSRC, units: list[str] | None = None):
        runtime, self.binding, unit_paths = simt_build.build(root, units)
        self.rt = ctypes.CDLL(str(runtime))
        self.rt.simt_alloc.restype = ctypes.c_void_p
        self.rt.simt_alloc.argtypes = [ctypes.c_size_t, ctypes.c_char_p]
        self.rt.simt_free.argtypes = [ctypes.c_void_p]
        self.rt.simt_configure.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
        self.rt.simt_report_field.restype = ctypes.c_char_p
        self.units = {name: ctypes.CDLL(str(path)) for name, path in unit_paths.items()}
        self.smem_optin = H100_SMEM_OPTIN

    def activate(self, schedule: str = "wait", seed: int = 0) -> None:
        """Makes this build's units the ones the binding launches, under ``schedule``."""
        self.rt.simt_clear_launchers()
        for lib in self.units.values():
            lib.simt_unit_register()
        self.rt.simt_configure(SCHEDULES[schedule], seed, self.smem_optin, 2)
        self.rt.simt_clear_report()

    def report(self) -> SimtError | None:
        kind = self.rt.simt_report_field(0).decode()
        if not kind:
            return None
        message = self.rt.simt_report_field(1).decode()
        block = tuple(self.rt.simt_report_int(i) for i in range(3))
        thread = self.rt.simt_report_int(3)
        where = f"block {block}" + (f", thread {thread} (warp {thread // 32}, lane {thread % 32})" if thread >= 0 else "")
        at = _lines(self.rt.simt_report_field(2).decode())
        return SimtError(kind, f"simt {kind}: {message}\n  {where}" + (f"\n  at {at}" if at else ""))

    @contextlib.contextmanager
    def guarded(self, tensors: dict, outputs: tuple[str, ...]):
        """The ``tensors`` (name -> tensor or None) as views of copies in guarded mappings
        (one per distinct storage); copied back for ``outputs`` when the body succeeds."""
        groups: dict[int, list[str]] = {}
        for name, t in tensors.items():
            if t is not None:
                groups.setdefault(t.untyped_storage().data_ptr(), []).append(name)
        buffers, views = [], {name: None for name in tensors}
        try:
            for names in groups.values():
                storage = tensors[names[0]].untyped_storage()
                n = storage.nbytes()
                raw = torch.empty(0, dtype=torch.uint8).set_(storage)
                ptr = self.rt.simt_alloc(n, "/".join(names).encode())
                guarded = torch.frombuffer((ctypes.c_uint8 * max(n, 1)).from_address(ptr), dtype=torch.uint8)[:n]
                buffers.append((ptr, raw, guarded, names))
                guarded.copy_(raw)
                for name in names:
                    t = tensors[name]
                    views[name] = torch.empty(0, dtype=t.dtype).set_(guarded.untyped_storage(), t.storage_offset(),
                                                                     t.shape, t.stride())
            yield views
            for _, raw, guarded, names in buffers:
                if any(name in outputs for name in names):
                    raw.copy_(guarded)
        finally:
            views.clear()
            for ptr, *_ in buffers:
                self.rt.simt_free(ptr)

    def call(self, fn, *args):
        """``fn(*args)`` of the binding; an emulator report becomes a SimtError."""
        self.rt.simt_clear_report()
        try:
            fn(*args)
        except RuntimeError as exc:
            report = self.report()
            if report is not None:
                raise report from None
            raise exc
        report = self.report()
        if report is not None:
            raise report


class SimtBackend(scuda.CudaBackend):
    """The ``cuda`` backend on CPU tensors: the same binding calls, emulated kernels."""

    def __init__(self, emulator: Emulator, schedule: str = "wait", seed: int = 0):
        super().__init__()
        self.emulator, self.schedule, self.seed = emulator, schedule, seed

    def __repr__(self):
        return f"SimtBackend(schedule={self.schedule!r}, seed={self.seed})"

    def library(self):
        return self.emulator.binding

    def unavailable_reason(self):
        return None

    def not_supported_reasons(self, problem, *, requires_grad=False):
        reasons = [r for r in super().not_supported_reasons(problem, requires_grad=requires_grad)
                   if not r.startswith("tensors are on")]
        if problem.head_dim % 8 == 0 and problem.head_dim <= scuda.MAX_HEAD_DIM:
            smem = scuda.smem_reason(problem.head_dim, requires_grad, self.emulator.smem_optin)
            if smem:
                reasons.append(smem)
        return reasons

    def forward(self, problem, out5, lse5):
        p = problem
        tables, block, head_strides = self._schedule(p)
        named = {"q": p.q, "k": p.k, "v": p.v, "out": out5, "lse": lse5, "mask": p.mask}
        named.update({f"layout.{i}": t for i, t in enumerate(tables)})
        self.emulator.activate(self.schedule, self.seed)
        with self.emulator.guarded(named, ("out", "lse")) as g:
            self.emulator.call(self.library().forward, g["q"], g["k"], g["v"], g["out"], g["lse"], g["mask"],
                               [g[f"layout.{i}"] for i in range(len(tables))], block, head_strides,
                               scuda._CAUSAL_CODES[p.causal], float(p.scale))

    def backward(self, problem, out5, dout5, lse5, dq5, dk5, dv5):
        p = problem
        tables, block, head_strides = self._schedule(p)
        named = {"q": p.q, "k": p.k, "v": p.v, "out": out5, "dout": dout5, "lse": lse5, "dq": dq5, "dk": dk5,
                 "dv": dv5, "mask": p.mask}
        named.update({f"layout.{i}": t for i, t in enumerate(tables)})
        self.emulator.activate(self.schedule, self.seed)
        with self.emulator.guarded(named, ("dq", "dk", "dv")) as g:
            self.emulator.call(self.library().backward, g["q"], g["k"], g["v"], g["out"], g["dout"], g["lse"],
                               g["dq"], g["dk"], g["dv"], g["mask"], [g[f"layout.{i}"] for i in range(len(tables))],
                               block, head_strides, scuda._CAUSAL_CODES[p.causal], float(p.scale))


@functools.lru_cache(maxsize=None)
def get_emulator() -> Emulator:
    """The emulated build of the checkout's csrc/, built (or taken from the cache) once."""
    return Emulator()
