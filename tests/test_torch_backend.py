"""Defects of the torch backend (issue 12 §4), each against the float64 oracle."""

import threading
import time

import pytest
import torch

import stfast
from stfast import torch_backend
from stfast.lowering import from5, lower
from stfast.reference import oracle

from helpers import assert_close, reference, reference_grads


def _layout(length=97, block=16, heads=1):
    mask = torch.rand(heads, length, length) > 0.7
    mask[..., 5, :] = False  # a query that sees nothing
    return stfast.layouts.from_mask(mask, block=block)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_return_lse_in_half_precision(dtype):
    layout = _layout()
    q, k, v = (torch.randn(2, 3, 97, 24).to(dtype) for _ in range(3))
    out, lse = stfast.attention(q, k, v, layout=layout, return_lse=True, backend="torch")
    ref, ref_lse = reference("dense", q, k, v, layout=layout)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=3e-3, rtol=3e-3)
    assert_close(out, ref, **tol)
    ref_lse = ref_lse.flatten(1, 2)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    alive = torch.isfinite(ref_lse)
    assert_close(lse[alive], ref_lse[alive], atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("layout", [False, True])
def test_lse_is_float32_for_every_input_dtype(layout):
    torch.manual_seed(3)  # a layout whose query blocks are not consecutive in their slice
    lay = _layout(33, 8) if layout else None
    q, k, v = (torch.randn(1, 2, 33, 8, dtype=torch.float64) for _ in range(3))
    _, lse = stfast.attention(q, k, v, layout=lay, return_lse=True, backend="torch")
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("path", ["dense", "causal", "space", "space+mask", "sparse"])
def test_nan_query_row_is_nan_in_that_row_only(path):
    if path.startswith("space"):
        q, k, v = (torch.randn(2, 3, 9, 2, 8) for _ in range(3))
        q[1, 2, 4, 1, 3] = float("nan")
        mask = torch.rand(9, 9) > 0.3 if path == "space+mask" else None
        if mask is not None:
            mask[4, 1] = True  # the NaN row sees a key
            mask[6] = False  # and a row sees none: zeros
        out = stfast.spatiotemporal_attention(q, k, v, axis="space", attn_mask=mask, backend="torch")
        bad = torch.zeros(2, 3, 9, 2, dtype=torch.bool)
        bad[1, 2, 4, 1] = True
    else:
        q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
        q[0, 1, 17, 2] = float("nan")
        lay = stfast.layouts.local(40, 12, block=8) if path == "sparse" else None
        out = stfast.attention(q, k, v, causal=path == "causal", layout=lay, backend="torch")
        bad = torch.zeros(1, 2, 40, dtype=torch.bool)
        bad[0, 1, 17] = True
    assert torch.isnan(out[bad]).all(), "a NaN query row must give NaN, never silent zeros"
    assert torch.isfinite(out[~bad]).all()


@pytest.mark.parametrize("layout", [False, True])
def test_nan_in_a_visible_key_makes_the_rows_that_see_it_nan(layout):
    q, k, v = (torch.randn(1, 1, 64, 8) for _ in range(3))
    k[0, 0, 10, 0] = float("nan")
    lay = stfast.layouts.local(64, 8, block=8) if layout else None
    out = stfast.attention(q, k, v, causal=True, layout=lay, backend="torch")
    rows = torch.isnan(out[0, 0]).any(-1)
    sees = torch.arange(64) >= 10
    if layout:  # key 10 is in key block 1; query i sees it when 10 is within its window
        sees &= torch.arange(64) <= 18
    assert rows[sees].all()
    # Dense: rows before key 10 never see it.  Block-sparse (documented): the rows of a
    # query block that gathers key block 1 (blocks 0-2) may be NaN even where the causal or
    # element mask hides key 10 (the mask is added to the NaN score); no other row is.
    assert not rows[24 if layout else 10:][~sees[24 if layout else 10:]].any()
    if not layout:
        assert not rows[:10].any()


def test_block_sparse_math_path_matches_oracle(monkeypatch):
    # The chunk math used where PyTorch's CPU flash kernel is not (GPU fallback).
    monkeypatch.setattr(torch_backend, "_flash_kernel", lambda device: False)
    layout = _layout(70, 16, heads=2)
    q, k, v = (torch.randn(1, 2, 70, 16, requires_grad=True) for _ in range(3))
    out, lse = stfast.attention(q, k, v, causal=True, layout=layout, return_lse=True, backend="torch")
    ref, ref_lse = reference("dense", q, k, v, causal=True, layout=layout, head_strides=(0, 1, 0))
    assert_close(out, ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    out.backward(dout)
    for got, want in zip((q.grad, k.grad, v.grad),
                         reference_grads("dense", q, k, v, dout, causal=True, layout=layout,
                                         head_strides=(0, 1, 0))):
        assert_close(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("d", [96, 192])
def test_block_sparse_float32_gradients_within_twice_plain_math_error(d):
    # Sharp softmax (scores of a few units) and large head dims: where the error tail was.
    torch.manual_seed(d)
    length = 150
    layout = stfast.layouts.from_mask(torch.rand(1, length, length) > 0.6, block=32)
    base = [torch.randn(1, 2, length, d, dtype=torch.float64) * (3.0 if i < 2 else 1.0) for i in range(3)]
    dout = torch.randn(1, 2, length, d, dtype=torch.float64)
    ref = reference_grads("dense", *base, dout, layout=layout)
    lowered = layout.lowered("cpu", (0, 0, 0))

    def plain_math(q, k, v):  # the oracle's own math, run in float32
        return from5(oracle(lower("dense", q, k, v, scale=d ** -0.5, layout=lowered), torch.float32)[0], "dense")

    for fn, errs in ((plain_math, []), (lambda q, k, v: stfast.attention(q, k, v, layout=layout, backend="torch"), [])):
        leaves = [t.float().requires_grad_() for t in base]
        fn(*leaves).backward(dout.float())
        errs += [(t.grad.double() - want).abs().max() for t, want in zip(leaves, ref)]
        if fn is plain_math:
            plain = errs
        else:
            for name, err, bound in zip(("dq", "dk", "dv"), errs, plain):
                assert err <= 2 * bound + 1e-7, f"{name}: error {err:.2e}, plain float32 math {bound:.2e}"


def test_slice_cache_is_keyed_by_problem_and_dropped_with_the_layout():
    import gc

    layout = _layout(70, 16)
    for causal, dtype, lq in ((False, torch.float32, 70), (True, torch.float32, 70), (True, torch.float64, 70)):
        q, k, v = (torch.randn(2, 2, lq, 8, dtype=dtype) for _ in range(3))
        out = stfast.attention(q, k, v, causal=causal, layout=layout, backend="torch")
        assert_close(out, reference("dense", q, k, v, causal=causal, layout=layout)[0], atol=2e-5, rtol=2e-5)
    key = id(layout.lowered("cpu", (0, 0, 0)))
    assert key in torch_backend._SLICE_CACHE
    del layout
    gc.collect()
    assert key not in torch_backend._SLICE_CACHE


def test_block_sparse_chunks_run_one_thread_each_and_sum_in_a_fixed_order(monkeypatch):
    # Issue 12 §1: with 2 intra-op threads, every operation on the calling thread opens
    # a parallel region that a busy CPU stalls; the chunks must run on worker threads of
    # one intra-op thread each, leave the caller's count as it was, and give the same
    # bits as one thread even when they finish out of order.
    # One query block per chunk at 1 and 2 threads alike: many chunks, the same ones.
    monkeypatch.setattr(torch_backend, "_GATHER_ELEMENTS", 1 << 11)
    torch.manual_seed(12)
    layout = stfast.layouts.local(160, 40, block=16)
    base = [torch.randn(2, 3, 160, 16) for _ in range(3)]
    dout = torch.randn(2, 3, 160, 16)
    seen, lock = [], threading.Lock()
    gather = torch_backend._Slice.gather

    def spy(self, *args):
        with lock:
            first = not seen
            seen.append((threading.get_ident(), torch.get_num_threads()))
        if first:
            time.sleep(0.05)  # the first chunk finishes after later ones
        return gather(self, *args)

    monkeypatch.setattr(torch_backend._Slice, "gather", spy)

    def run(threads):
        torch.set_num_threads(threads)
        leaves = [t.clone().requires_grad_() for t in base]
        out = stfast.attention(*leaves, layout=layout, backend="torch")
        out.backward(dout)
        assert torch.get_num_threads() == threads
        return [out.detach()] + [t.grad for t in leaves]

    caller = torch.get_num_threads()
    try:
        serial = run(1)
        seen.clear()
        pooled = run(2)
        fresh = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
    finally:
        torch.set_num_threads(caller)
    assert len(seen) > 4
    assert all(ident != threading.get_ident() and n == 1 for ident, n in seen), seen
    assert fresh == [2]  # threads started later still get the caller's count
    for got, want in zip(pooled, serial):
        assert torch.equal(got, want)
    leaves = [t.double() for t in base]
    assert_close(pooled[0], reference("dense", *leaves, layout=layout)[0], atol=2e-5, rtol=2e-5)
    for got, want in zip(pooled[1:], reference_grads("dense", *leaves, dout.double(), layout=layout)):
        assert_close(got, want, atol=5e-5, rtol=5e-5)


def test_block_sparse_chunk_error_is_raised_on_the_caller():
    caller = torch.get_num_threads()

    def work(i):
        if i == 3:
            raise ValueError("chunk 3")
        return (i,)

    with pytest.raises(ValueError, match="chunk 3"):
        torch_backend._each(2, [(i,) for i in range(8)], work, lambda i: None)
    assert torch.get_num_threads() == caller
