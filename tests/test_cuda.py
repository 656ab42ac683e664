"""The ``cuda`` backend: its loader on any machine, its sources with the machine's nvcc
(marker ``build``), and its kernels against the float64 oracle on a GPU (marker ``gpu``)."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import stfast
import stfast.cuda as scuda
from stfast import layouts
from stfast.lowering import lower, to5
from stfast.reference import oracle

from helpers import CAUSAL_NAMES

CSRC = Path(__file__).resolve().parent.parent / "csrc"


# ---------------------------------------------------------------- any machine

def test_import_and_unavailable_reason():
    backend = scuda.BACKEND
    assert backend.name == "cuda" and not backend.differentiable
    reason = backend.unavailable_reason()
    if torch.version.cuda is None or not torch.cuda.is_available():
        assert isinstance(reason, str) and "CUDA" in reason, reason
    assert stfast.backends.available()["cuda"] == reason


def test_status_is_one_line():
    line = scuda.status()
    assert isinstance(line, str) and "\n" not in line
    assert line.split(":")[0] in ("built", "cached", "JIT possible", "not usable"), line


def test_no_jit_switch_is_reported(monkeypatch):
    monkeypatch.setenv("STFAST_NO_JIT", "1")
    assert "STFAST_NO_JIT" in scuda._jit_reason()


def _cpu_problem(dtype=torch.float32, d=38, layout=None):
    q, k, v = (torch.randn(2, 3, 17, d, dtype=dtype) for _ in range(3))
    return lower("dense", q, k, v, scale=0.5, layout=layout)


def test_not_supported_reasons_name_the_cause():
    reasons = " | ".join(scuda.BACKEND.not_supported_reasons(_cpu_problem()))
    assert "cpu" in reasons and "float32" in reasons and "head dim 38" in reasons, reasons
    layout = layouts.local(17, window=8, block=16).lowered("cpu", (0, 0, 0))
    reasons = " | ".join(scuda.BACKEND.not_supported_reasons(_cpu_problem(torch.float16, 64, layout)))
    assert "layout block 16" in reasons and "head dim" not in reasons and "dtype" not in reasons, reasons
    q = torch.randn(2, 3, 17, 64, dtype=torch.float16)[..., 1:57]  # misaligned start, odd strides
    p = lower("dense", q, q, q, scale=0.5)
    reasons = " | ".join(scuda.BACKEND.not_supported_reasons(p))
    assert "16-byte" in reasons or "multiples of 8" in reasons, reasons


def test_smem_reason_refuses_backward_that_does_not_fit():
    # sm_86/89/120 allow 99 KiB (101376 bytes) per block: head dims above 192 fit the
    # forward there but not the backward, which must go to another backend, not raise.
    small, hopper = 101376, 232448
    assert scuda.smem_reason(256, False, small) is None
    reason = scuda.smem_reason(256, True, small)
    assert reason is not None and "backward" in reason and "256" in reason, reason
    assert scuda.smem_reason(200, True, small) is not None  # padded to 256
    for d in (8, 64, 72, 128, 192):
        assert scuda.smem_reason(d, True, small) is None, d
    for d in (8, 72, 128, 192, 256):
        assert scuda.smem_reason(d, True, hopper) is None, d
    assert scuda.smem_bytes(72) == scuda.smem_bytes(128)


def test_file_lock_excludes_a_second_holder(tmp_path):
    order = []
    held = threading.Event()

    def first():
        with scuda._file_lock(tmp_path / "x.lock"):
            held.set()
            time.sleep(0.3)
            order.append("first released")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with scuda._file_lock(tmp_path / "x.lock"):
        order.append("second acquired")
    thread.join()
    assert order == ["first released", "second acquired"]


def test_generated_kernel_files_are_current():
    spec = importlib.util.spec_from_file_location("stfast_generate", CSRC / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    expected = generate.expected_files()
    present = {p.name: p.read_text() for p in (CSRC / "kernels").glob("*.cu")}
    assert present == expected, "csrc/kernels is stale: run python csrc/generate.py"
    assert [p.name for p in scuda.source_files(CSRC)[1:]] == sorted(expected)


# ---------------------------------------------------------------- build (nvcc, no GPU)

def _nvcc_include_dir(nvcc: str, out_dir: Path) -> Path | None:
    """The CUDA headers nvcc itself uses (nvcc may be a wrapper outside the toolkit)."""
    probe = out_dir / "probe.cu"
    probe.write_text("")
    proc = subprocess.run([nvcc, "--dryrun", "-c", str(probe)], capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "INCLUDES=" in line and "SYSTEM" not in line:
            for flag in line.split('"')[1].split():
                path = Path(flag.removeprefix("-I"))
                if (path / "cuda_runtime_api.h").is_file():
                    return path
    return None


def _binding_command(out_dir: Path) -> list[str] | None:
    """g++ -fsyntax-only of the binding against torch's headers, or None if impossible."""
    cxx = shutil.which("g++") or shutil.which("c++")
    nvcc = scuda._nvcc()
    if cxx is None or nvcc is None:
        return None
    cuda_include = _nvcc_include_dir(nvcc, out_dir)
    if cuda_include is None:
        return None
    from torch.utils.cpp_extension import include_paths

    includes = include_paths() + [sysconfig.get_paths()["include"], str(cuda_include), str(CSRC)]
    torch_include = Path(include_paths()[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").is_file():
        # CPU-only torch wheels ship c10/cuda headers without this generated one.
        stub = out_dir / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.append(str(out_dir / "stub"))
    return [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            *(f"-I{p}" for p in includes), str(CSRC / "binding.cpp")]


def _compile_cache_entry(cmd: list[str], tmp_path: Path, nvcc: str) -> Path:
    """Where a successful compile of ``cmd`` keeps its object: keyed by the command (temp
    paths masked), the nvcc, g++ and torch versions and every csrc/ file, so any change to
    the sources, flags or toolchain compiles again."""
    digest = hashlib.sha256()
    for tool in (nvcc, shutil.which("g++") or shutil.which("c++")):  # nvcc compiles host code with g++
        if tool:
            digest.update(subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.encode())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(cmd).replace(str(tmp_path), "<tmp>").encode())
    for path in sorted(CSRC.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(CSRC).as_posix().encode())
            digest.update(path.read_bytes())
    base = os.environ.get("STFAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stfast")
    return Path(base) / "compile-check" / digest.hexdigest()[:24]


@pytest.mark.build
def test_cuda_sources_compile(tmp_path):
    nvcc = scuda._nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the flags torch builds kernels with

    commands = {}
    for arch in ("80", "90"):
        for src in sorted((CSRC / "kernels").glob("*.cu")):
            commands[f"{src.name} sm_{arch}"] = [
                nvcc, "-std=c++17", "-O3", "--Werror", "all-warnings", *COMMON_NVCC_FLAGS, f"-I{CSRC}",
                f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(src),
                "-o", str(tmp_path / f"{src.stem}_sm{arch}.o")]
    binding = _binding_command(tmp_path)
    if binding is not None:
        commands["binding.cpp"] = binding
    assert len(commands) >= 2 * 16

    def run(item):
        name, cmd = item
        out = Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else None
        entry = _compile_cache_entry(cmd, tmp_path, nvcc)
        if entry.is_file():  # this exact command passed before: reuse its object
            if out is not None:
                shutil.copyfile(entry, out)
            return name, 0, ""
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.{threading.get_ident()}")
            shutil.copyfile(out, tmp) if out is not None else tmp.write_bytes(b"")
            os.replace(tmp, entry)
        return name, proc.returncode, proc.stdout + proc.stderr

    # The binding (torch headers, the slowest unit) starts first so it overlaps the kernels.
    items = sorted(commands.items(), key=lambda kv: kv[0] != "binding.cpp")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run, items))
    failures = [f"{name}:\n{output[-3000:]}" for name, code, output in results if code != 0]
    assert not failures, "\n\n".join(failures)
    for arch in ("80", "90"):
        assert all((tmp_path / f"{s.stem}_sm{arch}.o").stat().st_size > 0 for s in (CSRC / "kernels").glob("*.cu"))
    if binding is None:
        pytest.skip("kernels compiled; the binding was not checked (no g++ or CUDA headers)")


# ---------------------------------------------------------------- GPU: kernels vs oracle

needs_cuda_backend = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = (torch.float16, torch.bfloat16)
EPS = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _cuda_ready():
    reason = scuda.BACKEND.unavailable_reason()
    if reason:
        pytest.fail(f"a GPU is present but the cuda backend is unavailable: {reason}")


def _lowered(kind, q, k, v, causal, scale, mask, layout, head_strides, device):
    lay = layout.lowered(device, head_strides) if layout is not None else None
    return lower(kind, q, k, v, scale=scale, causal=CAUSAL_NAMES[causal], mask=mask, layout=lay)


def _plain(kind, q, k, v, dout, causal, scale, mask, layout, head_strides, dtype):
    """(out5, lse5, dq, dk, dv) of the oracle's plain math in ``dtype`` (float64: the truth)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    p = _lowered(kind, *leaves, causal, scale, m, layout, head_strides, q.device)
    out5, lse5 = oracle(p, dtype=dtype)
    out5.backward(to5(dout.to(dtype), kind, p.groups))
    return out5.detach(), lse5.detach(), *(t.grad for t in leaves)


def _kernel(kind, q, k, v, dout, causal, scale, mask, layout, head_strides, backend=None):
    """(out5, lse5, dq, dk, dv) of the cuda backend (or ``backend``, e.g. the CPU SIMT
    emulator of tests/simt) called directly, on poisoned buffers."""
    backend = backend or scuda.BACKEND
    p = _lowered(kind, q, k, v, causal, scale, mask, layout, head_strides, q.device)
    reasons = backend.not_supported_reasons(p, requires_grad=True)
    if q.is_cuda:
        optin = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        smem = scuda.smem_reason(q.shape[-1], True, optin)
        if smem is not None and reasons == [smem]:
            pytest.skip(f"this GPU cannot run the backward for this head dim: {smem}")
    assert reasons == []
    out, out5 = p.new_output()
    out.fill_(float("nan"))
    lse5 = p.new_lse().fill_(float("nan"))
    backend.forward(p, out5, lse5)
    (dq, dq5), (dk, dk5), (dv, dv5) = p.new_grads(q, k, v)
    for g in (dq, dk, dv):
        g.fill_(float("nan"))
    backend.backward(p, out5, to5(dout, kind, p.groups), lse5, dq5, dk5, dv5)
    if q.is_cuda:
        torch.cuda.synchronize()
    return out5, lse5, dq, dk, dv


def check(kind, q, k, v, *, causal=False, scale=None, mask=None, layout=None, head_strides=(0, 0, 0), backend=None,
          identical=()):
    """Every output and gradient element of the kernel: error <= 2x plain PyTorch's + eps.
    ``backend`` replaces the cuda backend; each of ``identical`` (more backends, e.g. the
    emulator under other schedules) must then reproduce its results bit for bit."""
    if backend is None:
        _cuda_ready()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dout = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    args = (causal, scale, mask, layout, head_strides)
    got = _kernel(kind, q, k, v, dout, *args, backend=backend)
    truth = _plain(kind, q, k, v, dout, *args, torch.float64)
    plain = _plain(kind, q, k, v, dout, *args, q.dtype)
    for name, g, t, pl in zip(("out", "lse", "dq", "dk", "dv"), got, truth, plain):
        g, t, pl = g.double(), t.double(), pl.double()
        if name == "lse":
            dead = torch.isinf(t)
            assert torch.equal(torch.isinf(g) & (g < 0), dead), "lse: -inf exactly on rows that see no key"
            g, t, pl = g[~dead], t[~dead], pl[~dead]
        assert torch.isfinite(g).all(), f"{name}: non-finite (unwritten or NaN) elements"
        err = (g - t).abs().max().item() if g.numel() else 0.0
        ref = (pl - t).abs().max().item() if g.numel() else 0.0
        bound = 2 * ref + EPS[q.dtype] * max(1.0, t.abs().max().item() if t.numel() else 1.0)
        assert err <= bound, f"{name}: max error {err:.3e} > 2 x plain {q.dtype} error {ref:.3e} + eps"
    for other in identical:
        again = _kernel(kind, q, k, v, dout, *args, backend=other)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, again):
            assert torch.equal(a, b), f"{name} differs bit-wise under {other!r}"
    return got


def _rand(*shape, dtype, device="cuda"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk", [(1, 1), (17, 17), (97, 129), (129, 97), (1, 129), (256, 256)])
@pytest.mark.parametrize("d", [8, 32, 72, 128, 192, 256])
def test_dense_and_causal(dtype, causal, lq, lk, d):
    q, k, v = _rand(2, 3, lq, d, dtype=dtype), _rand(2, 3, lk, d, dtype=dtype), _rand(2, 3, lk, d, dtype=dtype)
    check("dense", q, k, v, causal=causal)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv", [3, 1])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_gqa(dtype, hkv, causal):
    q = _rand(2, 6, 97, 64, dtype=dtype)
    k, v = _rand(2, hkv, 129, 64, dtype=dtype), _rand(2, hkv, 129, 64, dtype=dtype)
    check("dense", q, k, v, causal=causal)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["space", "time"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [32, 72])
def test_spatiotemporal_strided_views(dtype, axis, causal, d):
    # q, k, v are slices of one fused projection [B, T, N, 3, H, D]: strided, never copied.
    qkv = _rand(2, 17, 13, 3, 4, d, dtype=dtype)
    q, k, v = qkv.unbind(3)
    check(axis, q, k, v, causal="top_left" if causal else False)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.float16], ids=str)
def test_masks_with_fully_masked_rows(dtype, mask_dtype):
    n = 97
    visible = torch.rand(n, n, device="cuda") < 0.3
    visible[5] = False  # a row that sees no key: output 0, LSE -inf, gradients 0
    if mask_dtype == torch.bool:
        mask = visible
    else:
        mask = torch.randn(n, n, device="cuda").masked_fill(~visible, float("-inf")).to(mask_dtype)
    q, k, v = (_rand(2, 3, n, 4, 64, dtype=dtype) for _ in range(3))
    out5, lse5, dq, *_ = check("space", q, k, v, mask=mask)
    assert torch.equal(out5[..., 5, :], torch.zeros_like(out5[..., 5, :]))
    assert torch.isneginf(lse5[..., 5]).all()
    assert torch.equal(dq[:, :, 5], torch.zeros_like(dq[:, :, 5]))


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_block_sparse(dtype, d):
    length = 300
    shared = layouts.bigbird(length, num_global=1, num_window=3, num_random=2, block=64)
    q, k, v = (_rand(2, 4, length, d, dtype=dtype) for _ in range(3))
    check("dense", q, k, v, layout=shared)
    # Per-head layouts with partial blocks (from an element mask) and causal on top.
    elem = torch.rand(4, length, length) < 0.2
    per_head = layouts.from_mask(elem, block=64)
    check("dense", q, k, v, layout=per_head, head_strides=(0, 1, 0), causal="top_left")
    big = layouts.local(length, window=128, block=128)
    check("dense", q, k, v, layout=big)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sparse_gqa(dtype):
    length = 200
    elem = torch.rand(4, length, length) < 0.3
    layout = layouts.from_mask(elem, block=64)
    q = _rand(1, 4, length, 64, dtype=dtype)
    k, v = _rand(1, 2, length, 64, dtype=dtype), _rand(1, 2, length, 64, dtype=dtype)
    check("dense", q, k, v, layout=layout, head_strides=(0, 2, 1))


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_api_autograd(dtype):
    _cuda_ready()
    q, k, v = (_rand(2, 4, 129, 64, dtype=dtype).requires_grad_() for _ in range(3))
    out = stfast.attention(q, k, v, causal=True, backend="cuda")
    out.backward(torch.ones_like(out))
    ref = stfast.attention(*(t.detach().double().requires_grad_() for t in (q, k, v)), causal=True,
                           backend="torch")
    assert (out.double() - ref).abs().max() < 2e-2
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
@needs_cuda_backend
def test_backward_is_deterministic():
    _cuda_ready()
    q = _rand(2, 6, 257, 64, dtype=torch.bfloat16)
    k, v = _rand(2, 2, 257, 64, dtype=torch.bfloat16), _rand(2, 2, 257, 64, dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    first = _kernel("dense", q, k, v, dout, "top_left", 0.125, None, None, (0, 0, 0))
    second = _kernel("dense", q, k, v, dout, "top_left", 0.125, None, None, (0, 0, 0))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
@needs_cuda_backend
def test_bad_buffers_raise_value_errors():
    _cuda_ready()
    q = _rand(1, 2, 17, 64, dtype=torch.float16)
    p = lower("dense", q, q, q, scale=0.125)
    out, out5 = p.new_output()
    with pytest.raises(ValueError, match="lse"):
        scuda.BACKEND.forward(p, out5, torch.empty(1, 2, 1, 16, device="cuda"))
    with pytest.raises(ValueError, match="out"):
        scuda.BACKEND.forward(p, torch.empty(1, 2, 1, 17, 128, dtype=torch.float16, device="cuda")[..., 1:65],
                              p.new_lse())


@pytest.mark.gpu
@needs_cuda_backend
def test_smem_table_matches_the_binding():
    _cuda_ready()
    exported = scuda.BACKEND.library().smem_bytes
    assert {dp: tuple(v) for dp, v in exported.items()} == {dp: scuda.smem_bytes(dp) for dp in scuda.PADDED_HEAD_DIMS}


@pytest.mark.gpu
@needs_cuda_backend
def test_small_shared_memory_gpu_refuses_only_what_does_not_fit(monkeypatch):
    _cuda_ready()
    q = _rand(1, 2, 17, 256, dtype=torch.float16)
    p = lower("dense", q, q, q, scale=0.1)
    assert scuda.BACKEND.not_supported_reasons(p, requires_grad=True) == []  # H100/H200/A100 fit
    real = torch.cuda.get_device_properties

    class SmallSmem:
        def __init__(self, props):
            self._props = props
            self.shared_memory_per_block_optin = 101376  # sm_86 / sm_89

        def __getattr__(self, name):
            return getattr(self._props, name)

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SmallSmem(real(d)))
    assert scuda.BACKEND.not_supported_reasons(p, requires_grad=False) == []
    reasons = " | ".join(scuda.BACKEND.not_supported_reasons(p, requires_grad=True))
    assert "shared memory" in reasons and "backward" in reasons, reasons


@pytest.mark.gpu
@needs_cuda_backend
def test_shared_grads_need_shared_kv():
    # One CTA sums dk/dv over the group reading k/v of b2 = 0 only: refuse unshared k/v.
    _cuda_ready()
    q, k, v = (_rand(1, 2, 3, 17, 64, dtype=torch.float16) for _ in range(3))
    p = lower("space", q, k, v, scale=0.1)  # [1, 2, 17, 3, 64] views with real strides
    out, out5 = p.new_output()
    lse5 = p.new_lse()
    scuda.BACKEND.forward(p, out5, lse5)
    dq5 = torch.empty_like(p.q)
    dk5 = torch.empty(*p.k.shape[:2], 1, *p.k.shape[3:], dtype=q.dtype, device="cuda").expand(p.k.shape)
    dv5 = torch.empty_like(dk5[:, :, :1]).expand(p.v.shape)
    with pytest.raises(ValueError, match="k and v shared"):
        scuda.BACKEND.backward(p, out5, torch.randn_like(out5), lse5, dq5, dk5, dv5)


_SANITIZER_SCRIPT = """
import torch, stfast.cuda as c
from stfast import layouts
from stfast.lowering import lower, to5
torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 97, 72, dtype=torch.float16, device="cuda") for _ in range(3))
lay = layouts.from_mask(torch.rand(2, 97, 97) < 0.3, block=64).lowered(q.device, (0, 1, 0))
for layout, causal in ((None, "bottom_right"), (lay, None)):
    p = lower("dense", q, k, v, scale=0.1, causal=causal, layout=layout)
    out, out5 = p.new_output(); lse = p.new_lse()
    c.BACKEND.forward(p, out5, lse)
    (dq, dq5), (dk, dk5), (dv, dv5) = p.new_grads(q, k, v)
    c.BACKEND.backward(p, out5, to5(torch.randn_like(out), "dense"), lse, dq5, dk5, dv5)
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    _cuda_ready()
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(_SANITIZER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(CSRC.parent))
    proc = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, fh.name],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0 and "ERROR SUMMARY: 0 errors" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
