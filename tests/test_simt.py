"""The CUDA kernels of csrc/, unchanged, on the CPU under the SIMT emulator (tests/simt),
against the float64 oracle with the GPU tests' pass rule (tests/test_cuda.py ``check``:
error <= 2x plain torch at that dtype, LSE -inf exactly on rows that see no key, every
poisoned element written), plus: bit-identical results under the three schedules and no
emulator report (race, bounds, alignment, divergence, deadlock).

The matrix is a covering selection, not the cross product: every value of every axis
appears (``test_matrix_covers_every_axis`` keeps it so)."""

from __future__ import annotations

import random

import pytest
import torch

from stfast import layouts

from simt import build as simt_build

reason = simt_build.unavailable_reason()
if reason:
    pytest.skip(reason, allow_module_level=True)

from simt.runner import SCHEDULES, SimtBackend, get_emulator  # noqa: E402
from test_cuda import check  # noqa: E402

pytestmark = pytest.mark.simt

F16, BF16 = torch.float16, torch.bfloat16

# (dtype, head dim, Lq, Lk, causal, variant); variants: "dense", "gqaN" (N query heads per
# kv head), "space"/"time" (strided views of a fused qkv), "mask-<dtype>" (with a fully
# masked row), "bigbird", "per-head" (partial blocks), "block128", "empty-blocks",
# "sparse-gqa".
CASES = [
    (F16, 8, 1, 1, None, "dense"),
    (BF16, 40, 17, 17, "top_left", "dense"),
    (F16, 64, 64, 65, "bottom_right", "dense"),
    (BF16, 72, 65, 64, "top_left", "dense"),
    (F16, 128, 97, 129, "bottom_right", "dense"),
    (BF16, 192, 129, 97, None, "dense"),
    (F16, 256, 130, 131, "top_left", "dense"),
    (BF16, 8, 161, 160, "bottom_right", "dense"),
    (F16, 40, 1, 130, "bottom_right", "dense"),
    (BF16, 64, 300, 300, "top_left", "dense"),
    (F16, 72, 257, 256, None, "dense"),
    (BF16, 128, 200, 17, "bottom_right", "dense"),
    (F16, 192, 65, 300, "top_left", "dense"),
    (BF16, 256, 17, 1, None, "dense"),
    (F16, 64, 129, 130, "bottom_right", "dense"),
    (BF16, 64, 97, 129, None, "gqa2"),
    (F16, 72, 65, 64, "bottom_right", "gqa3"),
    (BF16, 128, 130, 129, "top_left", "gqa6"),
    (F16, 40, 17, 17, "top_left", "space"),
    (BF16, 72, 17, 17, None, "time"),
    (F16, 64, 97, 97, None, "mask-bool"),
    (BF16, 128, 65, 65, None, "mask-float32"),
    (F16, 72, 130, 130, None, "mask-float16"),
    (BF16, 40, 17, 17, None, "mask-bfloat16"),
    (F16, 64, 300, 300, None, "bigbird"),
    (BF16, 128, 200, 200, "top_left", "per-head"),
    (F16, 256, 257, 257, None, "block128"),
    (BF16, 64, 200, 200, None, "empty-blocks"),
    (F16, 192, 150, 150, None, "sparse-gqa"),
]


def _id(case):
    dtype, d, lq, lk, causal, variant = case
    return f"{str(dtype)[6:]}-d{d}-{lq}x{lk}-{causal or 'dense'}-{variant}"


def _rand(*shape, dtype):
    return torch.randn(*shape, dtype=dtype)


def _backends():
    emulator = get_emulator()
    seed = random.getrandbits(32)  # printed in a failure by the backend's repr
    first, *others = (SimtBackend(emulator, schedule, seed) for schedule in SCHEDULES)
    return dict(backend=first, identical=others)


def _sparse_inputs(variant, dtype, d, length):
    h = 2
    q, k, v = (_rand(1, h, length, d, dtype=dtype) for _ in range(3))
    if variant == "bigbird":
        return q, k, v, layouts.bigbird(length, num_global=1, num_window=3, num_random=1, block=64), (0, 0, 0)
    if variant == "block128":
        return q, k, v, layouts.local(length, window=100, block=128), (0, 0, 0)
    elem = torch.rand(h, length, length) < 0.25
    if variant == "empty-blocks":
        elem[:, 64:128, :] = False  # a query block that sees no key block: LSE -inf, out 0
        elem[:, :, 128:192] = False  # a key block no query sees: dk = dv = 0
    if variant == "sparse-gqa":
        hq = 4
        q = _rand(1, hq, length, d, dtype=dtype)
        k, v = (_rand(1, h, length, d, dtype=dtype) for _ in range(2))
        return q, k, v, layouts.from_mask(torch.rand(hq, length, length) < 0.3, block=64), (0, 2, 1)
    return q, k, v, layouts.from_mask(elem, block=64), (0, 1, 0)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernels_match_the_oracle(case):
    dtype, d, lq, lk, causal, variant = case
    run = _backends()
    causal = causal or False
    if variant == "dense":
        q, k, v = _rand(1, 2, lq, d, dtype=dtype), _rand(1, 2, lk, d, dtype=dtype), _rand(1, 2, lk, d, dtype=dtype)
        check("dense", q, k, v, causal=causal, **run)
    elif variant.startswith("gqa"):
        group = int(variant[3:])
        q = _rand(1, 2 * group if group < 6 else 6, lq, d, dtype=dtype)
        hkv = q.shape[1] // group
        k, v = _rand(1, hkv, lk, d, dtype=dtype), _rand(1, hkv, lk, d, dtype=dtype)
        check("dense", q, k, v, causal=causal, **run)
    elif variant in ("space", "time"):
        # q, k, v slice one fused projection [B, T, N, 3, H, D]: strided, never copied.
        qkv = _rand(1, 5, lq, 3, 2, d, dtype=dtype) if variant == "space" else _rand(1, lq, 5, 3, 2, d, dtype=dtype)
        q, k, v = qkv.unbind(3)
        check(variant, q, k, v, causal=causal, **run)
    elif variant.startswith("mask-"):
        mask_dtype = getattr(torch, variant[5:])
        visible = torch.rand(lq, lk) < 0.3
        visible[lq // 2] = False  # sees no key: output 0, LSE -inf, gradients 0
        if mask_dtype == torch.bool:
            mask = visible
        else:
            mask = torch.randn(lq, lk).masked_fill(~visible, float("-inf")).to(mask_dtype)
        q, k, v = (_rand(1, 2, lq, 2, d, dtype=dtype) for _ in range(3))
        out5, lse5, dq, *_ = check("space", q, k, v, mask=mask, **run)
        assert torch.isneginf(lse5[..., lq // 2]).all()
        assert torch.equal(out5[..., lq // 2, :], torch.zeros_like(out5[..., lq // 2, :]))
        assert torch.equal(dq[:, :, lq // 2], torch.zeros_like(dq[:, :, lq // 2]))
    else:
        q, k, v, layout, head_strides = _sparse_inputs(variant, dtype, d, lq)
        out5, lse5, *_ = check("dense", q, k, v, causal=causal, layout=layout, head_strides=head_strides, **run)
        if variant == "empty-blocks":
            assert torch.isneginf(lse5[..., 64:128]).all()


def test_matrix_covers_every_axis():
    dtypes = {c[0] for c in CASES}
    dims = {c[1] for c in CASES}
    lengths = {c[2] for c in CASES} | {c[3] for c in CASES}
    causal = {c[4] for c in CASES if c[5] == "dense"}
    variants = {c[5] for c in CASES}
    assert dtypes == {F16, BF16}
    assert {8, 40, 64, 72, 128, 192, 256} <= dims
    assert {1, 17, 64, 65, 97, 129, 130} <= lengths and len({n for n in lengths if 150 <= n <= 300}) >= 3
    assert any(lk == lq + 1 for _, _, lq, lk, _, _ in CASES) and any(lq == lk + 1 for _, _, lq, lk, _, _ in CASES)
    assert causal == {None, "top_left", "bottom_right"}
    assert {"gqa2", "gqa3", "gqa6", "space", "time", "mask-bool", "mask-float32", "bigbird", "per-head",
            "block128", "empty-blocks"} <= variants
