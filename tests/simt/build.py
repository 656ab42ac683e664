"""Builds the emulated CUDA backend with g++, cached by the hash of what goes into it.

Three kinds of artefacts, each in its own cache entry under ``STFAST_SIMT_CACHE`` (default
``~/.cache/stfast/simt``), built under one file lock so concurrent test processes wait:

- ``libsimt_rt.so``: the emulator runtime (``runtime/``);
- the torch extension: ``csrc/binding.cpp`` unchanged plus ``launch_table.cpp``, which
  forwards every ``launch_fwd``/``launch_bwd`` to the launcher a loaded unit registered;
- one shared object per generated kernel unit (``csrc/kernels/*.cu``), keyed by the
  whole ``csrc/`` header set, so a mutated header rebuilds only the units asked for.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import stfast.cuda as scuda

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
RUNTIME_SOURCES = sorted((HERE / "runtime").glob("*.cpp"))
CSRC = HERE.parent.parent / "csrc"

RUNTIME_FLAGS = ["-std=c++17", "-O2", "-g1", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-Wall"]
UNIT_FLAGS = ["-std=c++17", "-O1", "-g1", "-fPIC", "-shared", "-fvisibility=hidden", "-DSTFAST_SIMT", "-Wall",
              "-Wno-unknown-pragmas"]
PASSES = {"fwd": 0, "bwd": 1}
DTYPES = {"fp16": "kFloat16", "bf16": "kBFloat16"}

UNIT_TEMPLATE = """#include "{source}"

extern "C" void simt_register_launcher(int pass, int dtype, int dp, void* fn);
extern "C" __attribute__((visibility("default"))) void simt_unit_register() {{
  simt_register_launcher({pass_id}, stfast::{dtype}, {dp},
                         reinterpret_cast<void*>(&stfast::launch_{pass_}<stfast::{dtype}, {dp}>));
}}
"""


def unavailable_reason() -> str | None:
    """Why the emulator cannot run here, or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the SIMT emulator's context switch is x86-64 Linux only, this is {sys.platform} {platform.machine()}"
    if shutil.which("g++") is None:
        return "the SIMT emulator needs g++ on PATH"
    return None


def cache_root() -> Path:
    base = os.environ.get("STFAST_SIMT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stfast", "simt")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.name.encode())
            h.update(part.read_bytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _compiler_id() -> str:
    return subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def _headers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".h", ".cuh"))


def _compile(cmd: list[str], out: Path) -> None:
    """Runs ``cmd`` (which writes ``out.tmp``) and renames it into place atomically."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"SIMT build failed: {' '.join(cmd)}\n{proc.stderr[-6000:]}")
    os.replace(out.with_suffix(".tmp"), out)


def runtime_library() -> Path:
    key = _digest(*RUNTIME_SOURCES, *_headers(HERE / "runtime"), *_headers(INCLUDE), RUNTIME_FLAGS, _compiler_id())
    out = cache_root() / f"rt-{key}" / "libsimt_rt.so"
    if not out.is_file():
        out.parent.mkdir(exist_ok=True)
        _compile(["g++", *RUNTIME_FLAGS, f"-I{INCLUDE}", *map(str, RUNTIME_SOURCES), "-ldl", "-o",
                  str(out.with_suffix(".tmp"))], out)
    return out


def unit_names(root: Path = CSRC) -> list[str]:
    return sorted(p.stem for p in (root / "kernels").glob("*.cu"))


def unit_library(root: Path, name: str, runtime: Path) -> Path:
    """The shared object of kernel unit ``name`` (e.g. ``fwd_fp16_hd64``) of ``root``."""
    pass_, dtype, hd = name.split("_")
    source = root / "kernels" / f"{name}.cu"
    key = _digest(source, *_headers(root), *_headers(INCLUDE), UNIT_FLAGS, _compiler_id(), runtime.parent.name)
    out = cache_root() / "units" / f"{name}-{key}.so"
    if not out.is_file():
        out.parent.mkdir(exist_ok=True)
        wrapper = out.with_suffix(".cpp")
        wrapper.write_text(UNIT_TEMPLATE.format(source=source, pass_=pass_, pass_id=PASSES[pass_],
                                                dtype=DTYPES[dtype], dp=int(hd[2:])))
        _compile(["g++", *UNIT_FLAGS, f"-I{INCLUDE}", f"-I{root}", str(wrapper), f"-L{runtime.parent}",
                  "-lsimt_rt", f"-Wl,-rpath,{runtime.parent}", "-o", str(out.with_suffix(".tmp"))], out)
    return out


def selftest_library() -> Path:
    """selftest.cpp: the kernels that test the emulator itself, on the checkout's csrc/."""
    with scuda._file_lock(cache_root() / "build.lock"):
        runtime = runtime_library()
        return _selftest(runtime)


def _selftest(runtime: Path) -> Path:
    source = HERE / "selftest.cpp"
    key = _digest(source, *_headers(CSRC), *_headers(INCLUDE), UNIT_FLAGS, _compiler_id(), runtime.parent.name)
    out = cache_root() / "units" / f"selftest-{key}.so"
    if not out.is_file():
        out.parent.mkdir(exist_ok=True)
        _compile(["g++", *UNIT_FLAGS, f"-I{INCLUDE}", f"-I{CSRC}", str(source), f"-L{runtime.parent}", "-lsimt_rt",
                  f"-Wl,-rpath,{runtime.parent}", "-o", str(out.with_suffix(".tmp"))], out)
    return out


def binding_module(root: Path, runtime: Path):
    """csrc/binding.cpp as a torch extension on CPU tensors, its launches forwarded to the
    registered units."""
    from torch.utils import cpp_extension

    table = HERE / "launch_table.cpp"
    key = _digest(root / "binding.cpp", root / "params.h", table, *_headers(INCLUDE), torch.__version__,
                  sys.version, _compiler_id(), runtime.parent.name)
    directory = cache_root() / f"binding-{key}"
    # A copy, so that every csrc tree with this binding (mutated kernels) shares one build.
    (directory / "src").mkdir(parents=True, exist_ok=True)
    for name in ("binding.cpp", "params.h"):
        if not (directory / "src" / name).is_file():
            shutil.copyfile(root / name, directory / "src" / name)
    (directory / "lock").unlink(missing_ok=True)  # torch's baton; our flock excludes other builders
    return cpp_extension.load(
        name=f"stfast_simt_{key}", sources=[str(directory / "src" / "binding.cpp"), str(table)],
        extra_include_paths=[str(INCLUDE), str(directory / "src")], extra_cflags=["-O1", "-DSTFAST_SIMT"],
        extra_ldflags=[f"-L{runtime.parent}", "-lsimt_rt", f"-Wl,-rpath,{runtime.parent}"],
        build_directory=str(directory), verbose=False)


def build(root: Path = CSRC, units: list[str] | None = None):
    """(runtime path, binding module, {unit name: shared object}) for the sources in
    ``root``; ``units`` limits which kernel units are built (default: all)."""
    names = unit_names(root) if units is None else units
    with scuda._file_lock(cache_root() / "build.lock"):
        runtime = runtime_library()
        jobs = max(1, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            libs = pool.map(lambda n: unit_library(root, n, runtime), names)
            binding = binding_module(root, runtime)
            built = dict(zip(names, libs))
    return runtime, binding, built
