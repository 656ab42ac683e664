"""Launcher decisions that a GPU would expose: resources per config, fp32 policy,
device guard, GQA grid split, causal tile order, grid limits.

The resource decisions are made by a model (:mod:`stfast.triton.resources`) that
``tests/triton_aot.py`` checks against real sm_80/sm_90 compiles; here the launcher's
use of it is checked with the GPU config lists and the devices' shared-memory limits,
and the kernels' logic under the interpreter.
"""

import contextlib

import pytest
import torch

from stfast.lowering import lower
from stfast.reference import oracle

from helpers import poisoned_kernel_grads

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
triton_backend = pytest.importorskip("stfast.triton").BACKEND
launch = pytest.importorskip("stfast.triton.launch")
kernels = pytest.importorskip("stfast.triton.kernels")

if triton_backend.unavailable_reason():
    pytest.skip(f"triton backend unavailable: {triton_backend.unavailable_reason()}",
                allow_module_level=True)

DEVICE = "cpu" if launch.INTERPRET else "cuda"
Target = launch.resources.Target
H100, A100, RTX4090 = Target(90, 232_448), Target(80, 166_912), Target(80, 101_376)
interpret = pytest.mark.interpret
TOL = dict(atol=1e-4, rtol=1e-4) if launch.INTERPRET else dict(atol=2e-3, rtol=2e-3)  # TF32 on a GPU


@pytest.fixture(autouse=True)
def _tf32_on_gpu(allow_tf32):
    if not launch.INTERPRET:
        allow_tf32(True)


def _meta(lq, d, dtype, *, kind="dense", lk=None, hq=2, hkv=2, **kw):
    if kind == "dense":
        q = torch.empty(1, hq, lq, d, dtype=dtype, device="meta")
        k = torch.empty(1, hkv, lk or lq, d, dtype=dtype, device="meta")
    else:
        q = k = torch.empty(1, lq, 7, hq, d, dtype=dtype, device="meta")
    return lower(kind, q, k, k, scale=d ** -0.5, **kw)


def _need(kernel, config, dtype, d, masked, target):
    return launch.resources.need(kernel, dtype, d, d, launch._tile(config), masked, target.arch)


# ---- defects 2, 3: every launch path knows its shared memory and registers ----------

@pytest.mark.parametrize("target", [H100, A100, RTX4090], ids=["sm90", "sm80", "sm89"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("masked", [False, True])
def test_selectable_configs_fit_shared_memory(target, dtype, d, masked):
    for kernel in ("fwd", "dq", "dkdv"):
        for lb in (0, 16, 64):
            kept = launch.selectable(kernel, dtype, d, d, lb, target, launch.GPU_CONFIGS[kernel], masked)
            for c in kept:
                assert _need(kernel, c, dtype, d, masked or lb > 0, target).smem <= target.smem_limit, (kernel, c)
                assert not lb or lb % c.kwargs["BLOCK_M"] == lb % c.kwargs["BLOCK_N"] == 0
            spilling = [c for c in kept if not _need(kernel, c, dtype, d, masked or lb > 0, target)
                        .fits(target.smem_limit, kernel)]
            assert not spilling or len(kept) == 1, "a spilling config is kept only when nothing else fits"


def test_configs_that_cannot_fit_are_not_tried():
    # Real sm_90 compiles (tests/triton_aot.py): forward 128x64 at bf16 D=256 needs
    # 262,144 B of shared memory; the dk/dv tiles spill at D=256.
    bf16 = torch.bfloat16
    fwd = launch.selectable("fwd", bf16, 256, 256, 0, H100, launch.GPU_CONFIGS["fwd"])
    assert fwd and all(c.kwargs["BLOCK_M"] < 128 for c in fwd)
    assert len(fwd) < len(launch.GPU_CONFIGS["fwd"])
    for kernel in ("fwd", "dq", "dkdv"):
        for d in (16, 32, 64, 128):
            for masked in (False, True):
                for c in launch.selectable(kernel, bf16, d, d, 0, H100, launch.GPU_CONFIGS[kernel], masked):
                    n = _need(kernel, c, bf16, d, masked, H100)
                    assert n.measured and n.spills == 0, (kernel, d, masked, c, n)


def test_fp32_packed_backward_wide_heads_takes_the_tiled_kernels(allow_tf32):
    allow_tf32(True)
    p = _meta(12, 200, torch.float32, kind="time", causal="top_left")
    assert launch.packed_warps(p, "packed_bwd", H100) is None  # 278,528 B on sm_90
    assert launch.resource_reasons(p, True, H100) == []  # the tiled kernels fit
    p = _meta(12, 256, torch.float32, kind="time")
    assert launch.packed_warps(p, "packed_fwd", A100) is None


@pytest.mark.parametrize("target", [H100, A100, RTX4090], ids=["sm90", "sm80", "sm89"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [8, 38, 72, 128, 200, 256])
def test_every_problem_runs_or_is_refused_never_out_of_resources(target, dtype, d, allow_tf32):
    allow_tf32(True)
    mask = torch.empty(300, 300, dtype=torch.bool, device="meta").expand(1, 2, 300, 300)
    for p in (_meta(300, d, dtype, causal="top_left"), _meta(16, d, dtype, kind="time"),
              _meta(300, d, dtype, hq=4, hkv=1), _meta(300, d, dtype, mask=mask)):
        reasons = launch.resource_reasons(p, True, target)
        if reasons:
            assert all("shared memory" in r for r in reasons), reasons
            continue
        for kernel, packed in (("fwd", "packed_fwd"), ("dq", "packed_bwd"), ("dkdv", "packed_bwd")):
            if launch.packed_warps(p, packed, target) is None:
                pad = launch._pad(d)
                assert launch.selectable(kernel, dtype, pad, pad, 0, target, launch.GPU_CONFIGS[kernel],
                                         p.mask is not None)


def test_fp32_follows_allow_tf32(allow_tf32):
    p = _meta(300, 64, torch.float32, causal="top_left")
    allow_tf32(False)
    assert launch._dot_precision(torch.float32) == "ieee"
    assert any("allow_tf32" in r for r in launch.resource_reasons(p, False, H100))
    assert launch.resource_reasons(p, False, None) == []  # the interpreter has no spills
    allow_tf32(True)
    assert launch._dot_precision(torch.float32) == "tf32"
    assert launch.resource_reasons(p, True, H100) == []


# ---- defect 5: every launch runs on q's device --------------------------------------

def test_device_guard_names_qs_device():
    guard = launch._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch._on_device(torch.device("cpu")), contextlib.nullcontext)


@interpret
def test_every_launch_is_inside_the_device_guard(monkeypatch):
    entered, launched = [], []
    real_guard = launch._on_device

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        with real_guard(device):
            yield
        entered.append(None)

    def recording(kernel):
        def run(*args, **kwargs):
            launched.append(bool(entered) and entered[-1] is not None)
            return kernel(*args, **kwargs)
        return run

    monkeypatch.setattr(launch, "_on_device", guard)
    for name in ("_fwd", "_dq", "_dkdv"):
        tuner = getattr(launch, name)
        monkeypatch.setattr(tuner, "run", recording(tuner.run))
    q = torch.randn(1, 2, 20, 8, device=DEVICE)
    p = lower("dense", q, q, q, scale=0.3, causal="top_left")
    monkeypatch.setattr(launch, "PACK_MAX_LEN", 0)
    out, out5 = p.new_output()
    lse5 = p.new_lse()
    launch.forward(p, out5, lse5)
    (_, dq5), (_, dk5), (_, dv5) = p.new_grads(q, q, q)
    launch.backward(p, out5, torch.randn_like(out5), lse5, dq5, dk5, dv5)
    assert entered[0] == q.device and launched == [True, True, True]


@pytest.mark.gpu
def test_tensors_on_a_second_gpu_run_there():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import stfast

    q = torch.randn(1, 2, 300, 64, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        out = stfast.attention(q, q, q, causal=True, backend="triton")
    ref = stfast.attention(q, q, q, causal=True, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


# ---- defect 7: the GQA/MQA dk/dv grid fills the GPU, deterministically ---------------

def test_mqa_backward_is_split_to_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(launch, "DKDV_MIN_PROGRAMS", 2 * 132)  # an H100
    p = _meta(4096, 128, torch.bfloat16, hq=32, hkv=1, causal="top_left")
    splits = launch.kv_group_splits(p)
    assert 32 % splits == 0 and splits * triton.cdiv(4096, 128) >= 264


@interpret
@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_split_gqa_backward_matches_the_oracle_and_is_deterministic(causal, monkeypatch):
    monkeypatch.setattr(launch, "DKDV_MIN_PROGRAMS", 10**6)  # split every group fully
    q, k, v = (torch.randn(1, h, 37, 16, device=DEVICE) for h in (4, 1, 1))
    p = lower("dense", q, k, v, scale=0.25, causal=causal)
    assert launch.kv_group_splits(p) == 4
    dout = torch.randn(1, 4, 37, 16, device=DEVICE)
    runs = []
    for _ in range(2):
        runs.append(poisoned_kernel_grads(launch, p, q, k, v, dout)[1])
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle(lower("dense", *leaves, scale=0.25, causal=causal))[0].flatten(1, 2)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, g, r, again in zip("qkv", runs[0], want, runs[1]):
        torch.testing.assert_close(g.double(), r, **TOL, msg=lambda m: f"d{name}: {m}")
        assert torch.equal(g, again), f"d{name} is not deterministic"


# ---- defect 8: causal tiles longest first; huge batches refused ----------------------

@triton.jit
def _tile_order_probe(OUT, CAUSAL: tl.constexpr):
    tl.store(OUT + tl.program_id(1), kernels._query_tile(CAUSAL))


@interpret
def test_causal_query_tiles_launch_longest_first():
    for causal, want in ((True, [5, 4, 3, 2, 1, 0]), (False, [0, 1, 2, 3, 4, 5])):
        out = torch.full((6,), -1, dtype=torch.int32, device=DEVICE)
        _tile_order_probe[(1, 6)](out, CAUSAL=causal)
        assert out.tolist() == want


def test_batches_beyond_the_grid_are_refused():
    q = torch.zeros(1, 1, 4, 8, device=DEVICE).expand(2**16, 2**15 + 1, 4, 8)  # stride 0: no memory
    p = lower("dense", q, q, q, scale=1.0)
    reasons = triton_backend.not_supported_reasons(p)
    assert any("B0*B1*B2" in r and str(2**31 - 1) in r for r in reasons), reasons
    assert not triton_backend.not_supported_reasons(lower("dense", q[:2, :3], q[:2, :3], q[:2, :3], scale=1.0))
