"""The SIMT emulator's own tests (tests/simt/selftest.cpp kernels): csrc's ldmatrix/mma
fragments against a matmul, fp16/bf16 rounding against torch, a double-buffered cp.async
loop whose planted races are caught under every schedule, and each memory/warp check."""

from __future__ import annotations

import ctypes

import pytest
import torch

from simt import build as simt_build

reason = simt_build.unavailable_reason()
if reason:
    pytest.skip(reason, allow_module_level=True)

from simt.runner import SCHEDULES, SimtError, get_emulator  # noqa: E402

pytestmark = pytest.mark.simt


@pytest.fixture(scope="module")
def selftest():
    emulator = get_emulator()
    return emulator, ctypes.CDLL(str(simt_build.selftest_library()))


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _launch(emulator, fn, tensors, outputs, *ints, schedule="wait"):
    """``fn`` on guarded copies of ``tensors`` under ``schedule``; a report -> SimtError."""
    emulator.activate(schedule, seed=1234)
    with emulator.guarded(tensors, outputs) as g:
        emulator.call(lambda: _check_rc(fn(*(_ptr(g[n]) for n in tensors), *ints)))


def _check_rc(rc):
    if rc != 0:
        raise RuntimeError(f"launch returned CUDA error {rc}")


def _ulps(x, dtype):
    return torch.finfo(dtype).eps * x.abs().clamp_min(1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trans", [0, 1], ids=["b-rows", "b-cols-trans"])
def test_mma_fragments_match_a_matmul(selftest, dtype, trans):
    emulator, lib = selftest
    a, b = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
    d = torch.full((16, 16), float("nan"), dtype=dtype)
    _launch(emulator, lib.simt_selftest_matmul, {"a": a, "b": b, "d": d}, ("d",),
            0 if dtype == torch.float16 else 1, trans, schedule="random")
    expected = a.double() @ (b.double() if trans else b.double().T)
    assert torch.isfinite(d).all()
    assert ((d.double() - expected).abs() <= _ulps(expected, dtype)).all(), (d.double() - expected).abs().max()


def test_rounding_matches_torch(selftest):
    _, lib = selftest
    x = torch.cat([
        torch.randn(20000) * torch.exp2(torch.randint(-30, 20, (20000,)).float()),
        torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14,
                      float("inf"), -float("inf"), 3.3895e38, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8]),
    ]).float()
    # Exact ties: halfway between neighbouring normal halves, subnormal halves, and bfloat16s.
    normal = torch.arange(0x0400, 0x7BFF, 3, dtype=torch.int16).view(torch.float16).float()
    ties = [(normal.view(torch.int32) + (1 << 12)).view(torch.float32), (torch.arange(1024) + 0.5) * 2.0**-24,
            (torch.randint(0, 0x7F80, (5000,), dtype=torch.int32) << 16 | 1 << 15).view(torch.float32)]
    x = torch.cat([x, *ties, *(-t for t in ties)]).float().contiguous()
    n = x.numel()
    h, b = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    lib.simt_selftest_round(_ptr(x), _ptr(h), _ptr(b), n)
    assert torch.equal(h, x.to(torch.float16).view(torch.int16))
    assert torch.equal(b, x.to(torch.bfloat16).view(torch.int16))
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    fh, fb = torch.empty(2**16), torch.empty(2**16)
    lib.simt_selftest_widen(_ptr(bits), _ptr(fh), _ptr(fb), 2**16)
    for got, want in ((fh, bits.view(torch.float16).float()), (fb, bits.view(torch.bfloat16).float())):
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        assert same.all()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_double_buffer_loop_and_its_races(selftest, schedule):
    emulator, lib = selftest
    tiles = 5
    src = torch.randn(tiles, 128, 8).half()
    out = torch.full((128,), float("nan"))
    _launch(emulator, lib.simt_selftest_pipeline, {"src": src, "out": out}, ("out",), tiles, 0, schedule=schedule)
    # Warp w's ldmatrix reads the 32 chunks warp w+1 copied, 8 per matrix; lane l gets
    # row l/4, columns 2(l%4) and 2(l%4)+1 of each of the 4 matrices, every tile.
    chunks = src.float().view(tiles, 4, 32, 8)
    assert torch.isfinite(out).all()
    reference = torch.zeros(128)
    for t in range(128):
        w, l = t // 32, t % 32
        rows = chunks[:, (w + 1) % 4].view(tiles, 4, 8, 8)[:, :, l // 4, 2 * (l % 4):2 * (l % 4) + 2]
        reference[t] = rows.sum()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)
    for variant, what in ((1, "write after read"), (2, "has not been waited for")):
        with pytest.raises(SimtError) as info:
            _launch(emulator, lib.simt_selftest_pipeline, {"src": src, "out": out}, ("out",), tiles, variant,
                    schedule=schedule)
        assert info.value.kind == "race" and (what in str(info.value) or "read after write" in str(info.value)), \
            str(info.value)
        assert "selftest.cpp" in str(info.value), str(info.value)


@pytest.mark.parametrize("which,kind,words", [
    (0, "memory", "past the end of tensor 'src'"),
    (1, "alignment", "not 16-byte aligned"),
    (2, "bounds", "outside the 2048 bytes of dynamic shared memory"),
    (3, "uninitialised", "nothing wrote"),
    (4, "deadlock", "never completes"),
    (5, "divergence", "different warp ops"),
    (6, "cp.async", "never waited for"),
])
def test_each_check_reports_with_location(selftest, which, kind, words):
    emulator, lib = selftest
    src = torch.randn(128 * 8).half()
    out = torch.zeros(128)
    with pytest.raises(SimtError) as info:
        _launch(emulator, lib.simt_selftest_check, {"src": src, "out": out}, ("out",), which)
    text = str(info.value)
    assert info.value.kind == kind and words in text, text
    assert "block (0, 0, 0), thread" in text and "selftest.cpp" in text, text
