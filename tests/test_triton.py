"""The triton backend against the float64 oracle: forward, LSE and dq/dk/dv.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest) in
float32 on tiny shapes (marker ``interpret``); the ``gpu`` cases check bf16/fp16
against the "at most twice plain PyTorch's error" rule and skip without a GPU.
"""

import pytest
import torch

import stfast
from stfast import layouts
from stfast.lowering import from5, lower, to5
from stfast.reference import oracle

triton_backend = pytest.importorskip("stfast.triton").BACKEND
launch = pytest.importorskip("stfast.triton.launch")

if triton_backend.unavailable_reason():
    pytest.skip(f"triton backend unavailable: {triton_backend.unavailable_reason()}",
                allow_module_level=True)

DEVICE = "cpu" if launch.INTERPRET else "cuda"
# float32 runs as TF32 on a GPU (IEEE float32 is refused there: it spills); the
# interpreter computes in IEEE float32.
TOL = dict(atol=1e-4, rtol=1e-4) if launch.INTERPRET else dict(atol=2e-3, rtol=2e-3)


@pytest.fixture(autouse=True)
def _tf32_on_gpu(allow_tf32):
    if not launch.INTERPRET:
        allow_tf32(True)
interpret = pytest.mark.interpret


@pytest.fixture(params=["packed", "tiled"])
def path(request, monkeypatch):
    """Run short sequences through the packed kernels and through the tiled ones."""
    if request.param == "tiled":
        monkeypatch.setattr(launch, "PACK_MAX_LEN", 0)
    return request.param


def with_paths(cases, length):
    """``cases`` x both paths, dropping "packed" where a sequence is longer than a
    packed tile (it would only repeat the tiled case)."""
    return [(*case, path) for case in cases for path in ("packed", "tiled")
            if path == "tiled" or length(*case) <= launch.PACK_MAX_LEN]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def run_triton(kind, q, k, v, dout, **kw):
    """Forward and backward through the backend, every output poisoned first."""
    p = lower(kind, q, k, v, **kw)
    assert not triton_backend.not_supported_reasons(p, requires_grad=True)
    out, out5 = p.new_output()
    lse5 = p.new_lse()
    out.fill_(float("nan"))
    lse5.fill_(float("nan"))
    triton_backend.forward(p, out5, lse5)
    grads = p.new_grads(q, k, v)
    for g, _ in grads:
        g.fill_(float("nan"))
    triton_backend.backward(p, out5, to5(dout, kind, p.groups), lse5, *(g5 for _, g5 in grads))
    return out, lse5, [g for g, _ in grads]


def run_oracle(kind, q, k, v, dout, mask=None, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    p = lower(kind, *leaves, mask=mask, **kw)
    out5, lse5 = oracle(p)
    out = from5(out5, kind)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), lse5, grads


def assert_lse(lse, ref):
    dead = torch.isinf(ref)
    assert torch.equal(torch.isneginf(lse), dead), "LSE must be -inf exactly on rows that see no key"
    torch.testing.assert_close(lse[~dead].double(), ref[~dead], **TOL)


def check(kind, q, k, v, *, scale=None, **kw):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = lower(kind, q, k, v, scale=scale, **{n: kw[n] for n in ("causal", "mask", "layout") if n in kw})
    dout = rand(*p.user_out_shape())
    out, lse, grads = run_triton(kind, q, k, v, dout, scale=scale, **kw)
    ref_out, ref_lse, ref_grads = run_oracle(kind, q, k, v, dout, scale=scale, **kw)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    assert_lse(lse, ref_lse)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape, name
        torch.testing.assert_close(g.double(), r, **TOL, msg=lambda m: f"d{name}: {m}")
    return out, lse


@interpret
@pytest.mark.parametrize("L,D,path", with_paths([(1, 8), (17, 38), (97, 72), (40, 16)], lambda L, D: L),
                         indirect=["path"])
def test_dense_odd_shapes(L, D, path):
    check("dense", rand(2, 2, L, D), rand(2, 2, L, D), rand(2, 2, L, D))


@interpret
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk,path", with_paths([(17, 17), (13, 29), (29, 13), (97, 83)], max),
                         indirect=["path"])
def test_causal(causal, lq, lk, path):
    out, lse = check("dense", rand(1, 2, lq, 24), rand(1, 2, lk, 24), rand(1, 2, lk, 24), causal=causal)
    if causal == "bottom_right" and lq > lk:
        assert torch.isneginf(lse[..., : lq - lk]).all()
        assert (out[:, :, : lq - lk] == 0).all()


@interpret
@pytest.mark.parametrize("hq,hkv,causal", [(4, 2, None), (3, 1, "bottom_right"), (4, 2, "top_left")])
def test_gqa(hq, hkv, causal):
    check("dense", rand(2, hq, 37, 16), rand(2, hkv, 45, 16), rand(2, hkv, 45, 16), causal=causal)


@interpret
def test_value_dim_differs():
    check("dense", rand(1, 2, 33, 20), rand(1, 2, 33, 20), rand(1, 2, 33, 12))


@interpret
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_with_fully_masked_rows(kind, path):
    b, h, lq, lk = 2, 2, 19, 23
    keep = torch.rand(b, h, lq, lk, device=DEVICE) > 0.4
    keep[:, :, 5] = False
    keep[1, 0, 11] = False
    if kind == "bool":
        mask = keep
    else:
        mask = torch.where(keep, torch.randn(b, h, lq, lk, device=DEVICE), float("-inf"))
    out, lse = check("dense", rand(b, h, lq, 16), rand(b, h, lk, 16), rand(b, h, lk, 16), mask=mask)
    assert torch.isneginf(lse[..., 5]).all() and (out[:, :, 5] == 0).all()


@interpret
def test_broadcast_mask_with_causal():
    # A stride-0 mask over batch and heads, combined with the causal rule.
    mask = (torch.rand(1, 1, 70, 70, device=DEVICE) > 0.3).expand(2, 2, 70, 70)
    check("dense", rand(2, 2, 70, 8), rand(2, 2, 70, 8), rand(2, 2, 70, 8), mask=mask, causal="top_left")


def _random_layout(lq, lk, block, heads=1, seed=0):
    """Block pattern cycling skip / full / partial (random elements), so every kind
    of block occurs; query row 2 sees no key."""
    g = torch.Generator().manual_seed(seed)
    mq, mk = -(-lq // block), -(-lk // block)
    h, i, j = torch.meshgrid(torch.arange(heads), torch.arange(mq), torch.arange(mk), indexing="ij")
    kinds = (h + i + 2 * j + seed) % 3
    kinds = kinds.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :lq, :lk]
    mask = (kinds == 1) | ((kinds == 2) & (torch.rand(heads, lq, lk, generator=g) > 0.5))
    mask[:, 2] = False
    return layouts.from_mask(mask, block=block)


@interpret
@pytest.mark.parametrize("block", [16, 32])
def test_block_sparse_full_and_partial(block):
    lay = _random_layout(45, 45, block)
    assert (lay.block_type == layouts.FULL).any() and (lay.block_type == layouts.PARTIAL).any()
    lowered = lay.lowered(DEVICE, (0, 0, 0))
    out, lse = check("dense", rand(2, 2, 45, 24), rand(2, 2, 45, 24), rand(2, 2, 45, 24), layout=lowered)
    assert torch.isneginf(lse[..., 2]).all()


@interpret
def test_block_sparse_per_head_gqa_causal():
    lay = _random_layout(40, 40, 16, heads=4, seed=1)
    lowered = lay.lowered(DEVICE, (0, 2, 1))  # head = b1 * groups + b2
    check("dense", rand(1, 4, 40, 16), rand(1, 2, 40, 16), rand(1, 2, 40, 16), layout=lowered,
          causal="top_left")


def _fused_qkv(b, t, n, h, d):
    qkv = rand(b, t, n, 3, h, d)
    return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]


@interpret
@pytest.mark.parametrize("axis,causal", [("space", None), ("time", None), ("time", "top_left")])
def test_spatiotemporal_fused_qkv(axis, causal, path):
    q, k, v = _fused_qkv(2, 6, 11, 2, 8)
    assert not q.is_contiguous()
    check(axis, q, k, v, causal=causal)


@interpret
def test_space_with_adjacency_mask(path):
    q, k, v = _fused_qkv(1, 3, 21, 2, 38)
    adj = torch.rand(21, 21, device=DEVICE) > 0.5
    adj[4] = False
    check("space", q, k, v, mask=adj)


@interpret
def test_time_packs_several_sequences():
    # T = 5: twelve sequences share one 64-row tile; the block-diagonal mask must
    # keep them apart (and the last, partly filled tile must not leak).
    q, k, v = _fused_qkv(2, 5, 13, 2, 8)
    assert launch.use_packed(lower("time", q, k, v, scale=1.0))
    check("time", q, k, v, causal="top_left")


@interpret
def test_backward_is_deterministic():
    q, k, v = rand(1, 4, 50, 16), rand(1, 1, 50, 16), rand(1, 1, 50, 16)
    dout = rand(1, 4, 50, 16)
    first = run_triton("dense", q, k, v, dout, scale=0.25, causal="top_left")[2]
    second = run_triton("dense", q, k, v, dout, scale=0.25, causal="top_left")[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _public_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    dout = torch.randn_like(out)
    out.backward(dout)
    return out, [t.grad for t in leaves], dout


@interpret
def test_public_attention_backward():
    q, k, v = rand(1, 4, 33, 16), rand(1, 2, 33, 16), rand(1, 2, 33, 16)
    out, grads, dout = _public_grads(
        lambda a, b, c: stfast.attention(a, b, c, causal="bottom_right", backend="triton"), (q, k, v))
    ref_out, _, ref_grads = run_oracle("dense", q, k, v, dout, scale=16 ** -0.5, causal="bottom_right")
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **TOL)


@interpret
@pytest.mark.parametrize("axis", ["space", "time"])
def test_public_spatiotemporal_backward(axis):
    q, k, v = _fused_qkv(1, 4, 9, 2, 8)
    out, grads, dout = _public_grads(
        lambda a, b, c: stfast.spatiotemporal_attention(a, b, c, axis=axis, causal=axis == "time",
                                                        backend="triton"), (q, k, v))
    ref_out, _, ref_grads = run_oracle(axis, q, k, v, dout, scale=8 ** -0.5,
                                       causal="top_left" if axis == "time" else None)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **TOL)


@interpret
def test_public_block_sparse_backward():
    # Per-query-head layout with GQA: the schedule tables travel through the custom op.
    lay = _random_layout(36, 36, 16, heads=4, seed=2)
    q, k, v = rand(1, 4, 36, 16), rand(1, 2, 36, 16), rand(1, 2, 36, 16)
    out, grads, dout = _public_grads(
        lambda a, b, c: stfast.block_sparse_attention(a, b, c, lay, backend="triton"), (q, k, v))
    ref_out, _, ref_grads = run_oracle("dense", q, k, v, dout, scale=0.25,
                                       layout=lay.lowered(DEVICE, (0, 2, 1)))
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **TOL)


@interpret
def test_public_sdpa_mask():
    q, k, v = rand(2, 2, 18, 16), rand(2, 2, 18, 16), rand(2, 2, 18, 16)
    mask = torch.rand(18, 18, device=DEVICE) > 0.5
    mask[3] = False
    out = stfast.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")
    ref, _, _ = run_oracle("dense", q, k, v, torch.ones_like(q), scale=0.25,
                           mask=mask.expand(2, 2, 18, 18))
    torch.testing.assert_close(out.double(), ref, **TOL)
    assert (out[:, :, 3] == 0).all()


@interpret
def test_refuses_what_it_cannot_run():
    q = rand(1, 1, 8, 8)

    def reasons(**kw):
        args = dict(q=q, k=q, v=q, scale=1.0)
        args.update(kw)
        return triton_backend.not_supported_reasons(lower("dense", **args))

    assert any("float64" in r for r in reasons(q=q.double(), k=q.double(), v=q.double()))
    big = rand(1, 1, 8, 300)
    assert any("head dims" in r for r in reasons(q=big, k=big, v=big))
    strided = rand(1, 1, 8, 16)[..., ::2]
    assert any("stride" in r for r in reasons(q=strided))
    small = layouts.from_mask(torch.ones(8, 8, dtype=torch.bool), block=8).lowered(DEVICE, (0, 0, 0))
    assert any("layout block" in r for r in reasons(layout=small))
    with pytest.raises(ValueError, match="triton"):
        stfast.attention(q.double(), q.double(), q.double(), backend="triton")


def _low_precision_case(dtype, kind, q, k, v, **kw):
    """The kernel's error must be at most twice plain PyTorch's at ``dtype`` (both
    measured against float64), plus a small epsilon."""
    scale = q.shape[-1] ** -0.5
    p = lower(kind, q, k, v, scale=scale, **kw)
    dout = torch.randn(p.user_out_shape(), device=q.device, dtype=dtype)
    out, _, grads = run_triton(kind, q, k, v, dout, scale=scale, **kw)
    ref_out, _, ref_grads = run_oracle(kind, q, k, v, dout, scale=scale, **kw)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low_out = from5(oracle(lower(kind, *leaves, scale=scale, **kw), dtype=dtype)[0], kind)
    low_grads = torch.autograd.grad(low_out, leaves, dout)
    eps = 1e-3 if dtype == torch.bfloat16 else 1e-4
    for got, low, ref in zip([out, *grads], [low_out, *low_grads], [ref_out, *ref_grads]):
        bound = 2 * (low.double() - ref).abs().max().item() + eps
        assert (got.double() - ref).abs().max().item() <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk,d", [(1, 129, 64), (97, 97, 72), (1023, 1000, 128), (256, 256, 38)])
def test_gpu_dense_low_precision(dtype, causal, lq, lk, d):
    _low_precision_case(dtype, "dense", rand(2, 4, lq, d, dtype=dtype), rand(2, 2, lk, d, dtype=dtype),
                        rand(2, 2, lk, d, dtype=dtype), causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis,t,n", [("time", 12, 207), ("time", 16, 64), ("space", 8, 196)])
def test_gpu_spatiotemporal_low_precision(dtype, axis, t, n):
    qkv = rand(2, t, n, 3, 4, 72, dtype=dtype)
    _low_precision_case(dtype, axis, qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2],
                        causal="top_left" if axis == "time" else None)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_gpu_block_sparse_low_precision(block):
    lay = _random_layout(1000, 1000, block, heads=4, seed=block)
    dtype = torch.bfloat16
    _low_precision_case(dtype, "dense", rand(1, 4, 1000, 64, dtype=dtype), rand(1, 4, 1000, 64, dtype=dtype),
                        rand(1, 4, 1000, 64, dtype=dtype), layout=lay.lowered("cuda", (0, 1, 0)))


@interpret
@pytest.mark.parametrize("mode", ["space", "time", "joint", "divided", "heads", "gated"])
def test_modules_through_the_triton_backend(mode):
    """Module -> functional -> custom op -> kernels, with the strided views a fused
    projection (and, for "heads", a head slice of it) produces."""
    torch.manual_seed(0)
    ref = stfast.SpatioTemporalAttention(32, 4, mode=mode, causal_time=True, backend="torch").to(DEVICE)
    tri = stfast.SpatioTemporalAttention(32, 4, mode=mode, causal_time=True, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = rand(2, 5, 6, 32)
    want, got = ref(x), tri(x)
    torch.testing.assert_close(got, want, **TOL)
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    for (name, a), b in zip(tri.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m: f"{name}: {m}")


@interpret
def test_sequence_modules_through_the_triton_backend():
    torch.manual_seed(0)
    x = rand(2, 40, 32)
    pairs = [
        (stfast.CausalSelfAttention(32, 4, num_kv_heads=2, backend="torch"),
         stfast.CausalSelfAttention(32, 4, num_kv_heads=2, backend="triton")),
        (stfast.BlockSparseSelfAttention(32, 4, stfast.layouts.local(40, window=9, block=16), backend="torch"),
         stfast.BlockSparseSelfAttention(32, 4, stfast.layouts.local(40, window=9, block=16), backend="triton")),
    ]
    for ref, tri in pairs:
        ref, tri = ref.to(DEVICE), tri.to(DEVICE)
        tri.load_state_dict(ref.state_dict())
        torch.testing.assert_close(tri(x), ref(x), **TOL)
    ref = stfast.MultiheadAttention(32, 4, batch_first=True, backend="torch").to(DEVICE)
    tri = stfast.MultiheadAttention(32, 4, batch_first=True, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    padding = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE)
    padding[1, 30:] = True
    kw = dict(key_padding_mask=padding, attn_mask=rand(40, 40), need_weights=False)
    torch.testing.assert_close(tri(x, x, x, **kw)[0], ref(x, x, x, **kw)[0], **TOL)
