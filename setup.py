"""Builds the optional CUDA extension ``stfast._C``; package metadata is in pyproject.toml.

Two ways to install:
  pip install .                          pure Python, in seconds: the build environment
                                         has no torch, so nothing is compiled
  pip install --no-build-isolation .     builds against the torch already installed, and
                                         compiles csrc/ when nvcc and a CUDA torch are there

torch is imported only when a CUDA build is wanted: nvcc is found (or STFAST_BUILD_CUDA=1)
and STFAST_SKIP_CUDA_BUILD is not set. pyproject.toml does not list torch as a build
requirement, because build isolation would install an unpinned (multi-GB CUDA) torch just
to build a pure-Python wheel; like flash-attn and NATTEN, the CUDA build takes the torch
the user installed, through --no-build-isolation.

Environment switches:
  STFAST_SKIP_CUDA_BUILD=1   never build the extension (the JIT build on first use remains)
  STFAST_BUILD_CUDA=1        build it even without a visible GPU (needs nvcc, a CUDA torch
                             and --no-build-isolation); failing to is an error, not a skip
  STFAST_CUDA_ARCHS="80;90"  target architectures (default 80;90)
  MAX_JOBS                   parallel compile jobs (default: from free memory and CPU count)

Without CUDA (no nvcc, no torch in the build environment, a CPU-only torch, or no GPU)
the extension is skipped with a message and stfast installs as pure Python; the cuda
backend then compiles on first use where it can.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
GIB_PER_JOB = 3  # peak resident memory of one nvcc job on these kernels, with margin


def _say(message: str) -> None:
    print(f"stfast setup.py: {message}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _nvcc() -> str | None:
    """nvcc where torch.utils.cpp_extension would look for it, without importing torch."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidate = Path(os.environ[var]) / "bin" / "nvcc"
            return str(candidate) if candidate.exists() else None
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _default_max_jobs() -> int:
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) for line in fh if ":" in line}
        free_gib = info["MemAvailable"] / 2**20
    except (OSError, KeyError, ValueError, IndexError):
        free_gib = 8.0
    return max(1, min(os.cpu_count() or 1, int(free_gib // GIB_PER_JOB)))


def _arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("STFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
             if a.strip()]
    flags = []
    for arch in archs:
        number = arch.removeprefix("sm_").removeprefix("compute_")
        if not number.rstrip("a").isdigit() or int(number.rstrip("a")) < 80:
            raise SystemExit(f"STFAST_CUDA_ARCHS must list architectures >= 80 such as '80;90', got {arch!r}")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
    # PTX of the newest architecture lets newer GPUs JIT the kernels from the driver.
    newest = max((a.removeprefix("sm_").removeprefix("compute_") for a in archs), key=lambda a: int(a.rstrip("a")))
    flags.append(f"-gencode=arch=compute_{newest.rstrip('a')},code=compute_{newest.rstrip('a')}")
    return flags


def _extensions():
    """``(ext_modules, cmdclass)`` for the CUDA extension, or nothing with the reason printed."""
    if _flag("STFAST_SKIP_CUDA_BUILD"):
        _say("STFAST_SKIP_CUDA_BUILD=1: skipping the CUDA extension (pure-Python install)")
        return [], {}
    forced = _flag("STFAST_BUILD_CUDA")
    if not forced and _nvcc() is None:
        _say("nvcc was not found (set CUDA_HOME): skipping the CUDA extension (pure-Python install)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        how = ("install torch first, then build with `pip install --no-build-isolation .` so the build "
               "sees it")
        if forced:
            raise SystemExit(f"STFAST_BUILD_CUDA=1 but torch is not importable in the build environment "
                             f"({exc}): {how}")
        _say(f"torch is not importable in the build environment ({exc}): skipping the CUDA extension "
             f"(pure-Python install); to compile it, {how}")
        return [], {}
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is built without CUDA"
    elif CUDA_HOME is None:
        reason = "nvcc was not found (set CUDA_HOME)"
    elif not forced and not torch.cuda.is_available():
        reason = "no CUDA device is visible (set STFAST_BUILD_CUDA=1 to build anyway)"
    if reason:
        if forced:
            raise SystemExit(f"STFAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"{reason}: skipping the CUDA extension; stfast installs without it and the cuda backend "
             f"compiles on first use where CUDA is available")
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    sources = [str((CSRC / "binding.cpp").relative_to(ROOT))]
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "kernels").glob("*.cu"))
    flags = _arch_flags()
    _say(f"building stfast._C ({len(sources)} files, {' '.join(flags)}, MAX_JOBS={os.environ['MAX_JOBS']})")
    ext = CUDAExtension(
        name="stfast._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *flags]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
