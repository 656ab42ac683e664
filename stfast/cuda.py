"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/``.

The extension is found in this order:

1. ``stfast._C``, built by ``setup.py`` when CUDA was present at install time;
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` and ninja, made on
   first use on a CUDA machine into a cache directory keyed by the stfast version, the
   torch/CUDA versions, the GPU architecture and a hash of the sources, under a file lock
   so that concurrent processes wait for one build instead of corrupting it.

``STFAST_NO_JIT=1`` disables the JIT build, ``STFAST_VERBOSE_BUILD=1`` shows the compiler,
``STFAST_CACHE_DIR`` moves the cache.  A failed build warns once with the compiler's
message and :meth:`CudaBackend.unavailable_reason` says why, so ``auto`` falls back.
Importing this module never needs a GPU or nvcc.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from .backends import Backend
from .lowering import Problem

_DTYPES = (torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool, torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # csrc/binding.cpp kMaxHeadDim: head dims are zero-padded to 64/128/192/256
LAYOUT_BLOCK_MULTIPLE = 64  # csrc/params.h kLayoutBlockMultiple
MAX_LENGTH = 64 * 65535  # one grid row per 64-row tile
PADDED_HEAD_DIMS = (64, 128, 192, 256)  # csrc/binding.cpp kHeadDims
_CAUSAL_CODES = {None: 0, "top_left": 1, "bottom_right": 2}
_JIT_NAME = "stfast_cuda"


def smem_bytes(head_dim: int) -> tuple[int, int]:
    """(forward, backward) dynamic shared memory per CTA for ``head_dim``: mirrors the
    tile sizes of csrc/params.h (the binding exports its own numbers as ``smem_bytes``)."""
    dp = next(d for d in PADDED_HEAD_DIMS if head_dim <= d)
    bm, bn = 64, (32 if dp > 128 else 64)  # fwd_block_m, fwd_block_n (also the dQ kernel's)
    kbn, kbm = 64, (32 if dp > 128 else 64)  # dkdv_block_n, dkdv_block_m
    fwd = (bm + 4 * bn) * dp * 2
    dq = (2 * bm + 4 * bn) * dp * 2
    dkdv = (2 * kbn + 4 * kbm) * dp * 2 + 4 * kbm * 4
    return fwd, max(dq, dkdv)


def smem_reason(head_dim: int, requires_grad: bool, optin: int) -> str | None:
    """Why the kernels for ``head_dim`` do not fit a device allowing ``optin`` bytes of
    shared memory per block (sm_86/89/120 allow 99 KiB: head dims above 192 run the
    forward there but not the backward), or None."""
    fwd, bwd = smem_bytes(head_dim)
    needed, which = (max(fwd, bwd), "backward") if requires_grad else (fwd, "forward")
    if needed <= optin:
        return None
    return (f"head dim {head_dim} needs {needed} bytes of shared memory per block for the {which} "
            f"pass; this GPU allows {optin}")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def sources_dir() -> Path | None:
    """The ``csrc`` directory: packaged next to the module, or in the source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "binding.cpp").is_file():
            return candidate
    return None


def source_files(root: Path) -> list[Path]:
    """The compile units: the binding and one kernel file per (pass, dtype, head dim)."""
    return [root / "binding.cpp"] + sorted((root / "kernels").glob("*.cu"))


def _sources_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cache_dir(capability: tuple[int, int], root: Path) -> Path:
    """Where the JIT build for this stfast, torch, CUDA, GPU arch and source tree lives."""
    from . import __version__

    base = os.environ.get("STFAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stfast")
    torch_version = torch.__version__.replace("+", "_")
    name = (f"stfast-{__version__}_torch-{torch_version}_cuda-{torch.version.cuda}"
            f"_sm{capability[0]}{capability[1]}_{_sources_hash(root)}")
    return Path(base) / "cuda" / name


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``flock`` on ``path``: released by the kernel if the holder dies, so a
    crashed build never leaves a stale lock behind."""
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"stfast: waiting for another process building the CUDA kernels in {path.parent}",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _built_module_file(directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{_JIT_NAME}*.so")) if directory.is_dir() else []
    return found[0] if found else None


def _jit_build(capability: tuple[int, int], root: Path):
    from torch.utils import cpp_extension

    directory = cache_dir(capability, root)
    directory.mkdir(parents=True, exist_ok=True)
    arch = f"{capability[0]}{capability[1]}"
    verbose = _flag("STFAST_VERBOSE_BUILD")
    with _file_lock(directory / "stfast.lock"):
        # torch's own baton file survives a killed build and would block forever; our
        # flock already excludes every other builder of this directory.
        (directory / "lock").unlink(missing_ok=True)
        fresh = _built_module_file(directory) is None
        if fresh:
            print(f"stfast: compiling the CUDA kernels for sm_{arch} into {directory} (first use, "
                  f"a few minutes; STFAST_VERBOSE_BUILD=1 shows the compiler)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(p) for p in source_files(root)],
            extra_include_paths=[str(root)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"],
            build_directory=str(directory),
            verbose=verbose,
        )
        if fresh:
            print(f"stfast: CUDA kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
    return module


def _prebuilt_spec():
    try:
        return importlib.util.find_spec("stfast._C")
    except (ImportError, ValueError):
        return None


def _device_reason() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"needs a GPU of compute capability 8.0 or newer (mma.sync bf16, cp.async); got {major}.{minor}"
    return None


def _jit_reason() -> str | None:
    if _flag("STFAST_NO_JIT"):
        return "stfast._C is not built and STFAST_NO_JIT=1 disables the JIT build"
    if os.name != "posix":
        return "stfast._C is not built and the JIT build needs a POSIX system (file locks)"
    if _nvcc() is None:
        return "stfast._C is not built and nvcc was not found (set CUDA_HOME) for a JIT build"
    if sources_dir() is None:
        return "stfast._C is not built and the CUDA sources (csrc/) are not installed for a JIT build"
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        return "stfast._C is not built and ninja is missing for a JIT build (pip install ninja)"
    return None


def status() -> str:
    """One line for ``python -m stfast``: built, cached, JIT possible, or why not.  Builds nothing."""
    if _prebuilt_spec() is not None:
        where = "stfast._C (built by setup.py)"
        reason = _device_reason()
        return f"built: {where}" + (f"; unusable here: {reason}" if reason else "")
    reason = _device_reason()
    if reason:
        return f"not usable: {reason}"
    jit = _jit_reason()
    if jit:
        return f"not usable: {jit}"
    root = sources_dir()
    directory = cache_dir(torch.cuda.get_device_capability(), root)
    if _built_module_file(directory) is not None:
        return f"cached: JIT build in {directory}"
    return f"JIT possible: compiles on first use with {_nvcc()} into {directory}"


class CudaBackend(Backend):
    name = "cuda"
    differentiable = False

    def __init__(self):
        self._lock = threading.Lock()
        self._module = None
        self._reason: str | None = None
        self._tried = False

    def _load(self):
        if _prebuilt_spec() is not None:
            return importlib.import_module("stfast._C")
        reason = _jit_reason()
        if reason:
            raise _Unavailable(reason)
        return _jit_build(torch.cuda.get_device_capability(), sources_dir())

    def library(self):
        """The extension module, loading (or JIT-building) it on first call."""
        with self._lock:
            if not self._tried:
                self._tried = True
                self._reason = _device_reason()
                if self._reason is None:
                    try:
                        self._module = self._load()
                    except _Unavailable as exc:
                        self._reason = str(exc)
                    except Exception as exc:  # a compiler error must not break stfast
                        message = str(exc).strip() or type(exc).__name__
                        self._reason = f"building the CUDA extension failed: {_first_error(message)}"
                        warnings.warn(f"stfast: building the CUDA extension failed, the cuda backend is "
                                      f"disabled and stfast falls back to other backends:\n{message[-6000:]}",
                                      RuntimeWarning, stacklevel=3)
        if self._module is None:
            raise RuntimeError(f"the cuda backend is unavailable: {self._reason}")
        return self._module

    def unavailable_reason(self) -> str | None:
        reason = _device_reason()
        if reason:
            return reason
        try:
            self.library()
        except RuntimeError:
            return self._reason
        return None

    def not_supported_reasons(self, problem: Problem, *, requires_grad: bool = False) -> list[str]:
        p = problem
        reasons = []
        if p.device.type != "cuda":
            reasons.append(f"tensors are on {p.device}; the cuda backend needs CUDA tensors")
        if p.dtype not in _DTYPES:
            reasons.append(f"dtype {p.dtype} is not supported by the cuda kernels (float16, bfloat16 only)")
        d = p.head_dim
        if d % 8 or d > MAX_HEAD_DIM:
            reasons.append(f"head dim {d} is not supported (multiples of 8 up to {MAX_HEAD_DIM})")
        elif p.device.type == "cuda":
            # Constant-folded by torch.compile; older torch lacks the field (the binding
            # still refuses with a ValueError then).
            optin = getattr(torch.cuda.get_device_properties(p.device), "shared_memory_per_block_optin", None)
            reason = smem_reason(d, requires_grad, optin) if optin else None
            if reason:
                reasons.append(reason)
        if p.v_dim != d:
            reasons.append(f"v's head dim {p.v_dim} differs from q/k's {d}")
        for name, t in (("q", p.q), ("k", p.k), ("v", p.v)):
            if t.stride(-1) != 1:
                reasons.append(f"{name} must have stride 1 in its last dim, got strides {tuple(t.stride())}")
            elif any(s % 8 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
                reasons.append(f"{name} strides {tuple(t.stride())} are not multiples of 8 elements (16-byte rows)")
            elif (t.storage_offset() * t.element_size()) % 16:
                reasons.append(f"{name} does not start at a 16-byte aligned address")
        if p.mask is not None and p.mask.dtype not in _MASK_DTYPES:
            reasons.append(f"mask dtype {p.mask.dtype} is not supported (bool, float32, float16, bfloat16)")
        if p.layout is not None and p.layout.block % LAYOUT_BLOCK_MULTIPLE:
            reasons.append(f"layout block {p.layout.block} is not a multiple of {LAYOUT_BLOCK_MULTIPLE}")
        if max(p.lq, p.lk) > MAX_LENGTH:
            reasons.append(f"sequence length {max(p.lq, p.lk)} exceeds {MAX_LENGTH}")
        if p.batch[0] * p.batch[1] * p.batch[2] >= 2**31:
            reasons.append(f"batch {p.batch} has 2^31 or more sequences")
        return reasons

    @staticmethod
    def _schedule(problem: Problem):
        lay = problem.layout
        if lay is None:
            return [], 0, [0, 0, 0]
        return lay.tables(), lay.block, list(lay.head_strides)

    def forward(self, problem: Problem, out5: torch.Tensor, lse5: torch.Tensor) -> None:
        p = problem
        tables, block, head_strides = self._schedule(p)
        self.library().forward(p.q, p.k, p.v, out5, lse5, p.mask, tables, block, head_strides,
                               _CAUSAL_CODES[p.causal], float(p.scale))

    def backward(self, problem: Problem, out5, dout5, lse5, dq5, dk5, dv5) -> None:
        p = problem
        tables, block, head_strides = self._schedule(p)
        self.library().backward(p.q, p.k, p.v, out5, dout5, lse5, dq5, dk5, dv5, p.mask, tables, block,
                                head_strides, _CAUSAL_CODES[p.causal], float(p.scale))


def _first_error(message: str) -> str:
    """The compiler's first error line, else the message's last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines)[0] if errors else lines[-1]


class _Unavailable(Exception):
    """The extension cannot be loaded here for a reason that is not a build failure."""


BACKEND = CudaBackend()
