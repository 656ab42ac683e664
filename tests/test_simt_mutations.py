"""The emulated oracle run can fail: each known bug of tests/simt/mutations.py, planted in
a copy of csrc/, must be caught (an emulator report, an oracle mismatch or results that
differ across schedules) on a small case set, which the unmutated copy passes.  Only the
fp16 head-dim-64 units are built per mutation."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from stfast import layouts

from simt import build as simt_build

reason = simt_build.unavailable_reason()
if reason:
    pytest.skip(reason, allow_module_level=True)

from simt.mutations import MUTATIONS, apply  # noqa: E402
from simt.runner import SCHEDULES, Emulator, SimtBackend  # noqa: E402
from test_cuda import check  # noqa: E402

pytestmark = pytest.mark.simt

UNITS = ["fwd_fp16_hd64", "bwd_fp16_hd64"]


def _cases():
    """(description, thunk(backends)) in order of how much each exercises: 3 K/V tiles
    with a causal offset, Lq = Lk + 1 with D < 64, Lk = Lq + 1, partial sparse blocks, GQA."""
    h = torch.float16

    def dense(lq, lk, d, causal):
        def run(b):
            q, k, v = torch.randn(1, 2, lq, d, dtype=h), torch.randn(1, 2, lk, d, dtype=h), torch.randn(1, 2, lk, d, dtype=h)
            check("dense", q, k, v, causal=causal, **b)
        return f"dense {lq}x{lk} d{d} {causal}", run

    def sparse(b):
        q, k, v = (torch.randn(1, 2, 200, 64, dtype=h) for _ in range(3))
        layout = layouts.from_mask(torch.rand(2, 200, 200) < 0.25, block=64)
        check("dense", q, k, v, layout=layout, head_strides=(0, 1, 0), **b)

    def gqa(b):
        q = torch.randn(1, 6, 65, 64, dtype=h)
        k, v = torch.randn(1, 2, 64, 64, dtype=h), torch.randn(1, 2, 64, 64, dtype=h)
        check("dense", q, k, v, **b)

    return [dense(97, 129, 64, "bottom_right"), dense(65, 64, 40, "top_left"), dense(64, 65, 64, "bottom_right"),
            ("per-head sparse 200 d64", sparse), ("gqa 3 65x64 d64", gqa)]


def _first_failure(root) -> str | None:
    emulator = Emulator(root, units=UNITS)
    seed = random.getrandbits(32)
    first, *others = (SimtBackend(emulator, s, seed) for s in SCHEDULES)
    for name, run in _cases():
        try:
            run(dict(backend=first, identical=others))
        except (AssertionError, RuntimeError) as exc:  # SimtError is a RuntimeError
            return f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def test_unmutated_copy_passes(tmp_path):
    shutil.copytree(simt_build.CSRC, tmp_path / "csrc")
    assert _first_failure(tmp_path / "csrc") is None


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name.split(":")[0] + f"-{i}" for i, m in enumerate(MUTATIONS)])
def test_planted_bug_is_caught(mutation, tmp_path):
    root = tmp_path / "csrc"
    shutil.copytree(simt_build.CSRC, root)
    apply(mutation, root)
    caught = _first_failure(root)
    assert caught is not None, f"planted bug not caught: {mutation.name}"
    print(f"\n{mutation.name} -> {caught}")
