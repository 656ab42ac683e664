"""The public functions on the torch backend against the float64 oracle."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import stfast
from helpers import LargestAllocation, assert_close, reference, reference_grads

TOL = dict(atol=2e-5, rtol=2e-5)


def _dense(b, hq, hkv, lq, lk, d, dv=None, requires_grad=False):
    q = torch.randn(b, hq, lq, d, requires_grad=requires_grad)
    k = torch.randn(b, hkv, lk, d, requires_grad=requires_grad)
    v = torch.randn(b, hkv, lk, dv or d, requires_grad=requires_grad)
    return q, k, v


@pytest.mark.parametrize("length,d", list(itertools.product([1, 17, 97, 129], [8, 38, 72, 128])))
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_dense_and_causal_match_oracle(length, d, causal):
    q, k, v = _dense(2, 2, 2, length, length, d)
    out, lse = stfast.attention(q, k, v, causal=causal, return_lse=True, backend="torch")
    ref, ref_lse = reference("dense", q, k, v, causal=causal)
    assert_close(out, ref, **TOL, what="out")
    assert_close(lse, ref_lse.flatten(1, 2), **TOL, what="lse")


@pytest.mark.parametrize("lq,lk", [(17, 97), (97, 17), (1, 129), (129, 1)])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_gqa_and_unequal_lengths(lq, lk, causal, hq, hkv):
    q, k, v = _dense(2, hq, hkv, lq, lk, 38, dv=24, requires_grad=True)
    out, lse = stfast.attention(q, k, v, causal=causal, return_lse=True, backend="torch")
    ref, ref_lse = reference("dense", q, k, v, causal=causal)
    assert_close(out, ref, **TOL, what="out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse.flatten(1, 2)))
    dout = torch.randn_like(out)
    out.backward(dout)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), reference_grads("dense", q, k, v, dout, causal=causal)):
        assert_close(got, want, atol=5e-5, rtol=5e-5, what=f"d{name}")


def test_bottom_right_rows_that_see_no_key_are_zero():
    q, k, v = _dense(1, 2, 2, 9, 4, 16, requires_grad=True)
    out, lse = stfast.attention(q, k, v, causal="bottom_right", return_lse=True, backend="torch")
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, :5], torch.zeros_like(q.grad[:, :, :5]))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_drop_in_matches_pytorch(kind):
    q, k, v = _dense(2, 4, 4, 33, 45, 16)
    if kind == "bool":
        mask = torch.rand(2, 1, 33, 45) > 0.3
        mask[..., 0] = True  # keep every row alive: PyTorch returns NaN for dead rows
    else:
        mask = torch.randn(1, 4, 33, 45)
    ours = stfast.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert_close(ours, theirs, **TOL)
    ref, _ = reference("dense", q, k, v, mask=mask.expand(2, 4, 33, 45), scale=0.3)
    assert_close(ours, ref, **TOL)


def test_sdpa_causal_gqa_and_fallbacks():
    q, k, v = _dense(2, 8, 2, 21, 21, 16)
    ours = stfast.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(ours, theirs, **TOL)
    q3, k3, v3 = (t[0] for t in _dense(1, 3, 3, 11, 11, 8))  # 3-D input runs on PyTorch's SDPA
    assert_close(stfast.scaled_dot_product_attention(q3, k3, v3),
                 F.scaled_dot_product_attention(q3, k3, v3), **TOL)
    torch.manual_seed(0)
    dropped = stfast.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    torch.manual_seed(0)
    assert torch.equal(dropped, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True))


def test_fully_masked_rows_give_zeros_and_zero_grads():
    q, k, v = _dense(2, 2, 2, 10, 12, 8, requires_grad=True)
    mask = torch.rand(2, 2, 10, 12) > 0.5
    mask[:, :, 3] = False
    out = stfast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    ref, _ = reference("dense", q, k, v, mask=mask)
    assert_close(out, ref, **TOL)
    out.backward(torch.randn_like(out))
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))
    additive = torch.zeros(10, 12).masked_fill(~mask[0, 0], float("-inf"))
    out = stfast.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


@pytest.mark.parametrize("layout", [False, True])
def test_nan_in_one_query_row_stays_in_that_row(layout):
    q, k, v = _dense(1, 2, 2, 8, 8, 8)
    q[0, 1, 5, 2] = float("nan")
    lay = stfast.layouts.causal(8, block=4) if layout else None
    out = stfast.attention(q, k, v, layout=lay, backend="torch")
    ref, _ = reference("dense", q, k, v, layout=lay)
    rest = torch.ones(2, 8, dtype=torch.bool)
    rest[1, 5] = False
    # PyTorch's CPU SDPA writes zeros for a NaN row, the math writes NaN: either way
    # it must not leak into any other row.
    assert not torch.isfinite(ref[0, 1, 5]).any()
    assert_close(out[0][rest], ref[0][rest], **TOL)


@pytest.mark.parametrize("axis", ["space", "time"])
@pytest.mark.parametrize("causal", [False, True])
def test_spatiotemporal_matches_oracle_on_fused_qkv_views(axis, causal):
    b, t, n, h, d = 2, 5, 7, 3, 8
    qkv = torch.randn(b, t, n, 3, h, d, requires_grad=True)
    q, k, v = qkv.unbind(3)  # strided views, as a fused projection produces them
    out = stfast.spatiotemporal_attention(q, k, v, axis=axis, causal=causal, backend="torch")
    ref, _ = reference(axis, q, k, v, causal=causal)
    assert out.shape == (b, t, n, h, d)
    assert_close(out, ref, **TOL)
    dout = torch.randn_like(out)
    out.backward(dout)
    want = torch.stack(reference_grads(axis, q, k, v, dout, causal=causal), 3)
    assert_close(qkv.grad, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_spatiotemporal_graph_adjacency_mask(mask_kind):
    b, t, n, h, d = 2, 3, 11, 2, 8
    q, k, v = (torch.randn(b, t, n, h, d) for _ in range(3))
    adjacency = torch.rand(n, n) > 0.6
    adjacency[4] = False  # a node with no neighbours: zeros, not NaN
    mask = adjacency if mask_kind == "bool" else torch.randn(n, n).masked_fill(~adjacency, float("-inf"))
    out = stfast.spatiotemporal_attention(q, k, v, axis="space", attn_mask=mask)
    ref, _ = reference("space", q, k, v, mask=mask)
    assert_close(out, ref, **TOL)
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("length,block", [(97, 16), (129, 32), (40, 64)])
def test_block_sparse_matches_oracle(heads, length, block):
    mask = torch.rand(heads, length, length) > 0.8
    mask[..., 0, :] = False  # a query that sees nothing
    for i in range(0, length, block):  # some full blocks too
        mask[..., i:i + block, i:i + block] = True
    layout = stfast.layouts.from_mask(mask, block=block)
    q, k, v = _dense(2, 4, 4, length, length, 24, requires_grad=True)
    out = stfast.block_sparse_attention(q, k, v, layout, backend="torch")
    strides = (0, 1, 1) if heads > 1 else (0, 0, 0)
    ref, _ = reference("dense", q, k, v, layout=layout, head_strides=strides)
    assert_close(out, ref, **TOL)
    dout = torch.randn_like(out)
    out.backward(dout)
    for got, want in zip((q.grad, k.grad, v.grad),
                         reference_grads("dense", q, k, v, dout, layout=layout, head_strides=strides)):
        assert_close(got, want, atol=5e-5, rtol=5e-5)


def test_block_sparse_combines_with_causal_gqa_and_lse():
    length = 70
    layout = stfast.layouts.from_mask(torch.rand(4, length, length) > 0.5, block=16)
    q, k, v = _dense(1, 4, 2, length, length, 16)
    out, lse = stfast.attention(q, k, v, causal=True, layout=layout, return_lse=True, backend="torch")
    ref, ref_lse = reference("dense", q, k, v, causal=True, layout=layout, head_strides=(0, 2, 1))
    assert_close(out, ref, **TOL)
    alive = torch.isfinite(ref_lse.flatten(1, 2))
    assert torch.equal(torch.isfinite(lse), alive)
    assert_close(lse[alive], ref_lse.flatten(1, 2)[alive], **TOL)


@pytest.mark.parametrize("fn", ["dense", "space", "sparse"])
def test_gradcheck_float64(fn):
    if fn == "space":
        args = [torch.randn(1, 2, 5, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        mask = torch.rand(5, 5) > 0.3

        def f(q, k, v):
            return stfast.spatiotemporal_attention(q, k, v, axis="space", attn_mask=mask, causal=True)
    else:
        args = [torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        layout = stfast.layouts.from_mask(torch.rand(9, 9) > 0.4, block=4) if fn == "sparse" else None

        def f(q, k, v):
            return stfast.attention(q, k, v, causal="bottom_right" if fn == "dense" else False,
                                    layout=layout, return_lse=True)
    assert torch.autograd.gradcheck(f, args)


def test_inputs_are_never_modified_and_outputs_are_fresh():
    q, k, v = _dense(2, 2, 2, 13, 13, 8)
    mask = torch.rand(13, 13) > 0.5
    before = [t.clone() for t in (q, k, v, mask)]
    out = stfast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for t, b in zip((q, k, v, mask), before):
        assert torch.equal(t, b)
    assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (q, k, v))


def test_lowering_never_copies():
    from stfast.lowering import lower

    qkv = torch.randn(2, 4, 6, 3, 2, 8)
    q, k, v = qkv.unbind(3)
    for kind in ("space", "time"):
        p = lower(kind, q, k, v, scale=1.0)
        assert p.q.data_ptr() == q.data_ptr() and p.k.data_ptr() == k.data_ptr()
        assert p.q.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    blhd = torch.randn(2, 9, 4, 8)  # [B, L, H, D] memory, used as [B, H, L, D]
    p = lower("dense", blhd.transpose(1, 2), blhd[:, :, :2].transpose(1, 2), blhd[:, :, :2].transpose(1, 2), scale=1.0)
    assert p.q.untyped_storage().data_ptr() == blhd.untyped_storage().data_ptr()
    assert p.k.shape[2] == 2 and p.k.stride(2) == 0


def test_zero_size_problems():
    q, k, v = _dense(0, 2, 2, 5, 5, 8)
    assert stfast.attention(q, k, v).shape == (0, 2, 5, 8)
    q, k, v = _dense(1, 2, 2, 0, 5, 8)
    assert stfast.attention(q, k, v).shape == (1, 2, 0, 8)
    q, k, v = _dense(1, 2, 2, 4, 0, 8)
    q[0, 0, 0, 0] = float("nan")
    q.requires_grad_()
    out, lse = stfast.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros(1, 2, 4, 8)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    x = torch.randn(1, 0, 3, 2, 4)
    assert stfast.spatiotemporal_attention(x, x, x, axis="time").shape == x.shape


def test_strided_blhd_layout_and_last_dim_stride():
    x = torch.randn(2, 17, 4, 16)  # [B, L, H, D]
    q = x.transpose(1, 2)
    out = stfast.attention(q, q, q, causal=True)
    ref, _ = reference("dense", q, q, q, causal=True)
    assert_close(out, ref, **TOL)
    y = torch.randn(2, 4, 16, 17).transpose(-1, -2)  # last dim not contiguous: still correct
    assert_close(stfast.attention(y, y, y), reference("dense", y, y, y)[0], **TOL)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(b=st.integers(1, 2), hkv=st.integers(1, 3), groups=st.integers(1, 3),
                  lq=st.integers(1, 40), lk=st.integers(1, 40), d=st.integers(1, 40),
                  dv=st.integers(1, 12), causal=st.sampled_from([False, True, "bottom_right"]),
                  seed=st.integers(0, 2**31 - 1))
def test_random_shapes_match_oracle(b, hkv, groups, lq, lk, d, dv, causal, seed):
    torch.manual_seed(seed)
    q, k, v = _dense(b, hkv * groups, hkv, lq, lk, d, dv=dv)
    out, lse = stfast.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = reference("dense", q, k, v, causal=causal)
    assert_close(out, ref, **TOL)
    ref_lse = ref_lse.flatten(1, 2)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    alive = torch.isfinite(ref_lse)
    assert_close(lse[alive], ref_lse[alive], **TOL)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(t=st.integers(1, 9), n=st.integers(1, 9), h=st.integers(1, 3), d=st.integers(1, 16),
                  axis=st.sampled_from(["space", "time"]), causal=st.booleans(),
                  seed=st.integers(0, 2**31 - 1))
def test_random_spatiotemporal_shapes_match_oracle(t, n, h, d, axis, causal, seed):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, t, n, h, d) for _ in range(3))
    out = stfast.spatiotemporal_attention(q, k, v, axis=axis, causal=causal)
    assert_close(out, reference(axis, q, k, v, causal=causal)[0], **TOL)


@pytest.mark.parametrize("builder", ["local", "bigbird"])
def test_block_sparse_never_builds_an_l_by_l_tensor(builder):
    length, heads, d = 4096, 2, 16
    if builder == "local":
        layout = stfast.layouts.local(length, window=128, block=64)
    else:
        layout = stfast.layouts.bigbird(length, num_global=1, num_window=3, num_random=1, block=64)
    q, k, v = _dense(1, heads, heads, length, length, d, requires_grad=True)
    with LargestAllocation() as watch:
        out = stfast.block_sparse_attention(q, k, v, layout, backend="torch")
        out.backward(torch.randn_like(out))
    assert watch.largest < heads * length * length // 8, \
        f"a tensor of {watch.largest} elements appeared (L x L x H = {heads * length * length})"
