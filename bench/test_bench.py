"""pytest-benchmark cases: small problems, stfast next to the SDPA code it replaces.

Every implementation is first checked against the float64 oracle (the same guard as
``python -m bench``); a wrong result fails the test instead of being timed.  CPU
cases compare the ``torch`` backend with hand-written SDPA; the kernel backends and
FlexAttention are benchmarked on a GPU (marker ``gpu``).  Run with
``pytest bench/ --benchmark-only``.
"""

import pytest
import torch

from bench.competitors import competitors
from bench.measure import TOLERANCE, Reference, make_step
from bench.shapes import Case, Inputs

CASES = {
    "dense": Case("causal", "dense", "dense", dict(B=1, H=4, L=256, D=64)),
    "causal": Case("causal", "causal", "causal", dict(B=1, H=4, L=256, D=64)),
    "space": Case("spatiotemporal", "space", "space", dict(B=1, T=8, N=64, H=4, D=32)),
    "time": Case("spatiotemporal", "time", "time", dict(B=1, T=8, N=64, H=4, D=32)),
    "block_sparse": Case("block_sparse", "local", "block_sparse", dict(B=1, H=4, L=1024, D=64),
                         layout=("local", dict(seq_len=1024, window=64, block=64))),
}
BASELINE = {"dense": "sdpa", "causal": "sdpa", "space": "permute+sdpa", "time": "permute+sdpa",
            "block_sparse": "sdpa+mask"}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
PASSES = ("fwd", "fwd+bwd")
ROUNDS = {"cpu": 7, "cuda": 50}


def _params():
    for name in CASES:
        for pass_ in PASSES:
            for impl in ("stfast[torch]", BASELINE[name]):
                yield pytest.param(name, impl, pass_, id=f"{name}-{pass_}-{impl}")
            for impl in ("stfast[triton]", "stfast[cuda]", "flex"):
                if impl == "flex" and name in ("dense", "space", "time"):
                    continue
                yield pytest.param(name, impl, pass_, id=f"{name}-{pass_}-{impl}", marks=pytest.mark.gpu)


@pytest.mark.parametrize("name,impl_name,pass_", list(_params()))
def test_attention(benchmark, name, impl_name, pass_):
    case = CASES[name]
    impl = next(i for i in competitors(case, DEVICE) if i.name == impl_name)
    if impl.fn is None:
        pytest.skip(f"{impl_name}: {impl.reason}")
    inputs = Inputs(case, DTYPE, DEVICE)
    ref = Reference(case, inputs, need_grads=pass_ != "fwd")
    step, checked = make_step(impl.fn, inputs, pass_, ref.dout)
    out, grads = checked()
    err = ref.error(out, grads)
    assert err <= TOLERANCE[DTYPE], f"{impl_name} {pass_}: error {err:.3g} vs the {ref.source}"
    benchmark.group = f"{name} {pass_}"
    timed = (lambda: (step(), torch.cuda.synchronize())) if DEVICE.type == "cuda" else step
    # Fixed rounds keep the whole file within its CI budget (under a minute on 2 cores).
    benchmark.pedantic(timed, rounds=ROUNDS[DEVICE.type], warmup_rounds=1)
