"""The nn.Modules: dependency structure of every mode, parity with plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F

import stfast

B, T, N, C, H = 2, 4, 6, 16, 4


def _plain_axis_attention(attn, x, axis, causal=False, mask=None):
    """The permute + SDPA pipeline users write by hand (TimeSformer style)."""
    b, t, n, c = x.shape
    q, k, v = attn.qkv(x).view(b, t, n, 3, H, c // H).permute(3, 0, 1, 2, 4, 5)
    if axis == "space":
        fold = lambda z: z.reshape(b * t, n, H, -1).transpose(1, 2)  # noqa: E731
        unfold = lambda z: z.transpose(1, 2).reshape(b, t, n, c)  # noqa: E731
    else:
        fold = lambda z: z.permute(0, 2, 3, 1, 4).reshape(b * n, H, t, -1)  # noqa: E731
        unfold = lambda z: z.view(b, n, H, t, -1).permute(0, 3, 1, 2, 4).reshape(b, t, n, c)  # noqa: E731
    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=mask, is_causal=causal)
    return attn.proj(unfold(out))


@pytest.mark.parametrize("causal_time", [False, True])
def test_modes_match_hand_written_pytorch(causal_time):
    torch.manual_seed(0)
    x = torch.randn(B, T, N, C, dtype=torch.float64)
    for mode in ("space", "time", "divided", "gated", "heads"):
        m = stfast.SpatioTemporalAttention(C, H, mode=mode, causal_time=causal_time).double()
        got = m(x)
        if mode in ("space", "time"):
            want = _plain_axis_attention(m.attn, x, mode, causal=causal_time and mode == "time")
        elif mode == "divided":
            want = _plain_axis_attention(m.spatial, _plain_axis_attention(m.temporal, x, "time", causal_time), "space")
        elif mode == "gated":
            hs = _plain_axis_attention(m.spatial, x, "space")
            ht = _plain_axis_attention(m.temporal, x, "time", causal_time)
            z = torch.sigmoid(m.gate_space(hs) + m.gate_time(ht))
            want = z * hs + (1 - z) * ht
        else:
            continue
        torch.testing.assert_close(got, want, msg=f"mode={mode}")


@pytest.mark.parametrize("mode", ["time", "divided", "gated", "heads", "joint"])
def test_causal_time_never_sees_the_future(mode):
    torch.manual_seed(0)
    m = stfast.SpatioTemporalAttention(C, H, mode=mode, causal_time=True).double()
    x = torch.randn(B, T, N, C, dtype=torch.float64)
    y = x.clone()
    y[:, 2:] = torch.randn_like(y[:, 2:])  # change frames 2.. only
    torch.testing.assert_close(m(x)[:, :2], m(y)[:, :2])
    assert not torch.allclose(m(x)[:, 2:], m(y)[:, 2:])


def test_dependency_structure_of_each_mode():
    torch.manual_seed(0)
    x = torch.randn(1, T, N, C, dtype=torch.float64, requires_grad=True)

    def influence(mode, t, n):
        m = stfast.SpatioTemporalAttention(C, H, mode=mode).double()
        m(x)[0, t, n].sum().backward()
        g = x.grad.abs().sum(-1)[0] > 0
        x.grad = None
        return g

    space = influence("space", 1, 2)
    assert space[1].all() and not space[[0, 2, 3]].any()  # only its own frame
    time = influence("time", 1, 2)
    assert time[:, 2].all() and not time[:, [0, 1, 3, 4, 5]].any()  # only its own position
    for mode in ("divided", "joint"):
        assert influence(mode, 1, 2).all()  # two hops (or joint) reach every token
    for mode in ("heads", "gated"):  # space and time side by side: its frame and its position
        seen = influence(mode, 1, 2)
        assert seen[1].all() and seen[:, 2].all() and not seen[0, 0] and not seen[3, 5]


def test_spatial_mask_and_layout_restrict_space_passes():
    torch.manual_seed(0)
    x = torch.randn(1, T, N, C, dtype=torch.float64, requires_grad=True)
    adjacency = torch.eye(N, dtype=torch.bool) | torch.eye(N, dtype=torch.bool).roll(1, 1)
    m = stfast.SpatioTemporalAttention(C, H, mode="space").double()
    m(x, spatial_mask=adjacency)[0, 0, 3].sum().backward()
    seen = x.grad.abs().sum(-1)[0, 0] > 0
    assert seen.tolist() == adjacency[3].tolist()
    layout = stfast.layouts.from_mask(adjacency, block=2)
    ml = stfast.SpatioTemporalAttention(C, H, mode="space", spatial_layout=layout).double()
    ml.load_state_dict(m.state_dict())
    torch.testing.assert_close(ml(x), m(x, spatial_mask=adjacency))


def test_causal_and_block_sparse_self_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 19, C, dtype=torch.float64)
    c = stfast.CausalSelfAttention(C, H, num_kv_heads=2).double()
    y = x.clone()
    y[:, 10:] += 1
    torch.testing.assert_close(c(x)[:, :10], c(y)[:, :10])
    full = stfast.layouts.from_mask(torch.ones(19, 19, dtype=torch.bool).tril(), block=8)
    s = stfast.BlockSparseSelfAttention(C, H, full).double()
    plain = stfast.CausalSelfAttention(C, H).double()
    plain.load_state_dict(s.state_dict())
    torch.testing.assert_close(s(x), plain(x))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("variant", ["plain", "kvdim", "bias_kv", "causal"])
def test_multihead_attention_parity(batch_first, variant):
    torch.manual_seed(0)
    kw = dict(batch_first=batch_first, dtype=torch.float64)
    if variant == "kvdim":
        kw.update(kdim=12, vdim=10)
    if variant == "bias_kv":
        kw.update(add_bias_kv=True)
    ref = torch.nn.MultiheadAttention(C, H, **kw)
    ours = stfast.MultiheadAttention(C, H, **kw)
    ours.load_state_dict(ref.state_dict())
    lq, lk = (9, 9) if variant == "causal" else (9, 11)
    q = torch.randn(2, lq, C, dtype=torch.float64)
    k = torch.randn(2, lk, kw.get("kdim", C), dtype=torch.float64)
    v = torch.randn(2, lk, kw.get("vdim", C), dtype=torch.float64)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    kpm = torch.zeros(2, lk, dtype=torch.bool)
    kpm[0, -2:] = True
    if variant == "causal":
        mask = torch.ones(lq, lk, dtype=torch.bool).triu(1)
        args = dict(attn_mask=mask, is_causal=True)
    else:
        args = dict(attn_mask=torch.randn(lq, lk, dtype=torch.float64),
                    key_padding_mask=kpm.double().masked_fill(kpm, float("-inf")))
    want = ref(q, k, v, need_weights=False, **args)[0]
    got = ours(q, k, v, need_weights=False, **args)[0]
    torch.testing.assert_close(got, want)
    want_w = ref(q, k, v, **args)
    got_w = ours(q, k, v, **args)
    torch.testing.assert_close(got_w[0], want_w[0])
    torch.testing.assert_close(got_w[1], want_w[1])


def test_module_gradients_flow_to_every_parameter():
    torch.manual_seed(0)
    for mode in ("divided", "gated", "heads", "joint"):
        m = stfast.SpatioTemporalAttention(C, H, mode=mode, causal_time=True)
        m(torch.randn(B, T, N, C)).square().mean().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{mode}: {name}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["space", "time", "joint", "divided", "heads", "gated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modules_on_gpu_kernels_match_float64(mode, dtype):
    """On a GPU, `auto` runs the kernels; their error against float64 must be at most
    twice that of the torch backend at the same dtype (plus a small epsilon)."""
    torch.manual_seed(0)
    ref = stfast.SpatioTemporalAttention(64, 4, mode=mode, causal_time=True, backend="torch").double().cuda()
    x = torch.randn(2, 8, 50, 64, dtype=torch.float64, device="cuda")
    if mode == "joint":
        ref(x)
    want = ref(x)
    errors = {}
    for backend in ("auto", "torch"):
        m = stfast.SpatioTemporalAttention(64, 4, mode=mode, causal_time=True, backend=backend).cuda().to(dtype)
        m.load_state_dict(ref.state_dict())
        errors[backend] = (m(x.to(dtype)).double() - want).abs().max().item()
    assert errors["auto"] <= 2 * errors["torch"] + 1e-3, errors


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_accepts_every_mask_shape_torch_accepts(batch_first):
    # The stricter argument checks must still take each form nn.MultiheadAttention takes.
    torch.manual_seed(0)
    kw = dict(batch_first=batch_first, dtype=torch.float64)
    ref = torch.nn.MultiheadAttention(C, H, **kw).eval()
    ours = stfast.MultiheadAttention(C, H, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    q, k = torch.randn(2, 9, C, dtype=torch.float64), torch.randn(2, 11, C, dtype=torch.float64)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, :3] = True
    for args in (dict(attn_mask=torch.rand(2 * H, 9, 11) > 0.5, key_padding_mask=kpm),
                 dict(attn_mask=torch.randn(2 * H, 9, 11, dtype=torch.float64)),
                 dict(key_padding_mask=kpm.double().masked_fill(kpm, float("-inf")))):
        args["attn_mask"] = args.get("attn_mask")
        if args["attn_mask"] is not None and args["attn_mask"].dtype == torch.bool:
            args["attn_mask"][:, :, 0] = False  # every query keeps a key: torch gives NaN otherwise
        torch.testing.assert_close(ours(q, k, k, need_weights=False, **args)[0],
                                   ref(q, k, k, need_weights=False, **args)[0])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kvdim", [False, True])
def test_multihead_attention_scripts_as_pytorchs_implementation(batch_first, kvdim):
    # Documented: torch.jit.script works, and a scripted module is PyTorch's own
    # multi-head attention on the same parameters (stfast's dispatch is not TorchScript).
    torch.manual_seed(0)
    kw = dict(batch_first=batch_first, dtype=torch.float64, add_bias_kv=not kvdim)
    if kvdim:
        kw.update(kdim=12, vdim=10)
    ref = torch.nn.MultiheadAttention(C, H, **kw).eval()
    ours = stfast.MultiheadAttention(C, H, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    scripted = torch.jit.script(ours)
    q = torch.randn(2, 9, C, dtype=torch.float64)
    k = torch.randn(2, 11, kw.get("kdim", C), dtype=torch.float64)
    v = torch.randn(2, 11, kw.get("vdim", C), dtype=torch.float64)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    mask = torch.randn(9, 11, dtype=torch.float64)
    for need_weights in (True, False):
        got = scripted(q, k, v, need_weights=need_weights, attn_mask=mask)
        want = ref(q, k, v, need_weights=need_weights, attn_mask=mask)
        torch.testing.assert_close(got[0], want[0])
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1])
    # Which implementation ran: eager, a backend that cannot run here is refused by
    # stfast's dispatch; scripted, there is no stfast dispatch to refuse it.
    strict = stfast.MultiheadAttention(C, H, backend="cuda", **kw).eval()
    strict.load_state_dict(ref.state_dict())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' cannot run this problem"):
            strict(q, k, v, need_weights=False)
    torch.testing.assert_close(torch.jit.script(strict)(q, k, v, need_weights=False)[0],
                               ref(q, k, v, need_weights=False)[0])
