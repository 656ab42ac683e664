"""Bad input raises ValueError/TypeError naming the argument, the expected and the
received value."""

import pytest
import torch

import stfast


def _qkv(*shape, dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


Q, K, V = _qkv(2, 4, 16, 8)
X = torch.randn(2, 3, 5, 2, 8)
LAYOUT = stfast.layouts.from_mask(torch.ones(16, 16, dtype=torch.bool), block=8)

CASES = [
    ("q not a tensor", lambda: stfast.attention([1.0], K, V), TypeError, "q must be a torch.Tensor"),
    ("integer dtype", lambda: stfast.attention(Q.long(), K, V), TypeError, "q must be float16"),
    ("wrong rank", lambda: stfast.attention(Q[0], K, V), ValueError, "q must be 4-D [B, H, L, D], got shape (4, 16, 8)"),
    ("dtype mismatch", lambda: stfast.attention(Q, K.double(), V), TypeError, "k must have q's dtype torch.float32, got torch.float64"),
    ("head dim mismatch", lambda: stfast.attention(Q, K[..., :4], V), ValueError, "k's head dim must equal q's (8), got 4"),
    ("batch mismatch", lambda: stfast.attention(Q, K[:1], V[:1]), ValueError, "k and v must have q's batch size 2, got 1 and 1"),
    ("v length mismatch", lambda: stfast.attention(Q, K, V[:, :, :9]), ValueError, "v must have k's heads and length (4, 16), got (4, 9)"),
    ("head counts", lambda: stfast.attention(Q, K[:, :3], V[:, :3]), ValueError, "q's head count (4) must be a multiple of k/v's head count, got 3"),
    ("causal value", lambda: stfast.attention(Q, K, V, causal="top"), ValueError, "causal must be False, True, 'top_left' or 'bottom_right', got 'top'"),
    ("scale type", lambda: stfast.attention(Q, K, V, scale="x"), TypeError, "scale must be a finite float or None, got 'x'"),
    ("scale nan", lambda: stfast.attention(Q, K, V, scale=float("nan")), TypeError, "scale must be a finite float"),
    ("backend name", lambda: stfast.attention(Q, K, V, backend="tpu"), ValueError, "backend must be one of ('auto', 'torch', 'triton', 'cuda'), got 'tpu'"),
    ("layout type", lambda: stfast.attention(Q, K, V, layout="causal"), TypeError, "layout must be a stfast.BlockLayout or None, got str"),
    ("layout size", lambda: stfast.attention(*_qkv(2, 4, 17, 8), layout=LAYOUT), ValueError, "layout must cover seq_len_q=17, seq_len_k=17; got a layout for seq_len_q=16, seq_len_k=16"),
    ("layout heads", lambda: stfast.attention(Q, K, V, layout=stfast.layouts.from_mask(torch.ones(3, 16, 16, dtype=torch.bool), block=8)), ValueError, "layout must have 1 or 4 heads (one per query head), got 3"),
    ("block sparse without layout", lambda: stfast.block_sparse_attention(Q, K, V, None), TypeError, "layout must be a stfast.BlockLayout, got None"),
    ("sdpa mask shape", lambda: stfast.scaled_dot_product_attention(Q, K, V, attn_mask=torch.ones(3, 16, dtype=torch.bool)), ValueError, "attn_mask must be broadcastable to [2, 4, 16, 16], got shape [3, 16]"),
    ("sdpa mask dtype", lambda: stfast.scaled_dot_product_attention(Q, K, V, attn_mask=torch.ones(16, 16, dtype=torch.int64)), TypeError, "attn_mask must be bool or floating point, got torch.int64"),
    ("sdpa mask and causal", lambda: stfast.scaled_dot_product_attention(Q, K, V, attn_mask=torch.ones(16, 16, dtype=torch.bool), is_causal=True), ValueError, "attn_mask must be None when is_causal=True"),
    ("sdpa gqa off", lambda: stfast.scaled_dot_product_attention(Q, K[:, :2], V[:, :2]), ValueError, "key must have query's 4 heads (or 1, broadcast) unless enable_gqa=True, got 2"),
    ("sdpa dropout", lambda: stfast.scaled_dot_product_attention(Q, K, V, dropout_p=1.5), ValueError, "dropout_p must be a float in [0, 1], got 1.5"),
    ("axis", lambda: stfast.spatiotemporal_attention(X, X, X, axis="depth"), ValueError, "axis must be 'space' or 'time', got 'depth'"),
    ("st rank", lambda: stfast.spatiotemporal_attention(Q, K, V, axis="space"), ValueError, "q must be 5-D [B, T, N, H, D], got shape (2, 4, 16, 8)"),
    ("st shapes", lambda: stfast.spatiotemporal_attention(X, X[:, :, :2], X[:, :, :2], axis="time"), ValueError, "k must match q's [B, N, H] = [2, 5, 2] for axis='time' (only the attended T may differ), got [2, 2, 2]"),
    ("st causal", lambda: stfast.spatiotemporal_attention(X, X, X, axis="time", causal="bottom_right"), ValueError, "causal must be True or False, got 'bottom_right'"),
    ("st mask shape", lambda: stfast.spatiotemporal_attention(X, X, X, axis="space", attn_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "attn_mask must be broadcastable to [5, 5], got shape [3, 3]"),
    ("module dim", lambda: stfast.SpatioTemporalAttention(30, 4), ValueError, "num_heads must be a positive divisor of dim=30, got 4"),
    ("module mode", lambda: stfast.SpatioTemporalAttention(32, 4, mode="axial"), ValueError, "mode must be one of ('space', 'time', 'joint', 'divided', 'heads', 'gated'), got 'axial'"),
    ("module heads odd", lambda: stfast.SpatioTemporalAttention(30, 3, mode="heads"), ValueError, "num_heads must be even, got 3"),
    ("module input", lambda: stfast.SpatioTemporalAttention(16, 4)(torch.randn(2, 3, 8)), ValueError, "x must have shape [B, T, N, C] with C=16, got (2, 3, 8)"),
    ("module kv heads", lambda: stfast.CausalSelfAttention(16, 4, num_kv_heads=3), ValueError, "num_kv_heads must divide num_heads=4, got 3"),
    ("sparse module length", lambda: stfast.BlockSparseSelfAttention(16, 4, LAYOUT)(torch.randn(1, 9, 16)), ValueError, "x must have L=16 tokens (the layout's seq_len), got 9"),
    ("layout block", lambda: stfast.BlockLayout(torch.ones(2, 2), block=0, seq_len_q=16), ValueError, "block must be a positive int, got 0"),
    ("layout shape", lambda: stfast.BlockLayout(torch.ones(3, 2), block=8, seq_len_q=16), ValueError, "block_type must have shape [H|1, 2, 2] for seq_len_q=16, seq_len_k=16, block=8; got (1, 3, 2)"),
    ("layout block type", lambda: stfast.BlockLayout(torch.ones(2, 2), block=True, seq_len_q=16), TypeError, "block must be a positive int, got True of type bool"),
    ("layout seq_len type", lambda: stfast.BlockLayout(torch.ones(2, 2), block=8, seq_len_q=16.0), TypeError, "seq_len_q must be an int >= 1, got 16.0 of type float"),
    ("layout None", lambda: stfast.BlockLayout(None, block=8, seq_len_q=16), TypeError, "block_type must be a torch.Tensor, got NoneType"),
    ("layout value wraps", lambda: stfast.BlockLayout(torch.full((2, 2), 257), block=8, seq_len_q=16), ValueError, "block_type values must be 0 (skip), 1 (full) or 2 (partial), got 257 at [0, 0, 0]"),
    ("layout value fraction", lambda: stfast.BlockLayout(torch.full((2, 2), 0.5), block=8, seq_len_q=16), ValueError, "block_type values must be 0 (skip), 1 (full) or 2 (partial), got 0.5"),
    ("layout value truncates", lambda: stfast.BlockLayout(torch.full((2, 2), 1.9), block=8, seq_len_q=16), ValueError, "block_type values must be 0 (skip), 1 (full) or 2 (partial), got 1.89"),
    ("layout float masks", lambda: stfast.BlockLayout(torch.full((2, 2), 2), block=8, seq_len_q=16, partial_masks=torch.ones(1, 8, 8), partial_index=torch.zeros(2, 2, dtype=torch.int32)), TypeError, "partial_masks must be a bool tensor (True = attend), got torch.float32"),
    ("layout float index", lambda: stfast.BlockLayout(torch.full((2, 2), 2), block=8, seq_len_q=16, partial_masks=torch.ones(1, 8, 8, dtype=torch.bool), partial_index=torch.full((2, 2), 0.7)), TypeError, "partial_index must be an integer tensor, got torch.float32"),
    ("layout index shape", lambda: stfast.BlockLayout(torch.full((2, 2), 2), block=8, seq_len_q=16, partial_masks=torch.ones(1, 8, 8, dtype=torch.bool), partial_index=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "partial_index must be broadcastable to block_type's shape [1, 2, 2], got [3, 2]"),
    ("from_mask dtype", lambda: stfast.layouts.from_mask(torch.ones(4, 4)), TypeError, "mask must be a bool tensor, got dtype torch.float32"),
    ("use name", lambda: stfast.backends.use("gpu").__enter__(), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,call,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(name, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)


def test_device_mismatch_is_named():
    meta = torch.randn(2, 4, 16, 8, device="meta")
    with pytest.raises(ValueError, match="k must be on q's device cpu, got meta"):
        stfast.attention(Q, meta, V)


def test_strict_backend_lists_reasons():
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run this problem: .+"):
        stfast.attention(Q.double(), K.double(), V.double(), backend="cuda")


B_, L_, E_, H_ = 2, 7, 16, 4
X_MHA = torch.randn(L_, B_, E_)
BOOL = dict(dtype=torch.bool)

# Each is refused by torch.nn.MultiheadAttention too (AssertionError/RuntimeError, or
# accepted and silently reinterpreted where stfast used to); stfast says which argument.
MHA_CASES = [
    ("int attn_mask", dict(attn_mask=torch.ones(L_, L_, dtype=torch.int64)), TypeError, "attn_mask must be bool (True = masked out) or floating point (added to the scores), got torch.int64"),
    ("int key_padding_mask", dict(key_padding_mask=torch.zeros(B_, L_, dtype=torch.int64)), TypeError, "key_padding_mask must be bool"),
    ("transposed key_padding_mask", dict(key_padding_mask=torch.zeros(L_, B_, **BOOL)), ValueError, "key_padding_mask must have shape (batch, source length) = (2, 7), got (7, 2)"),
    ("key_padding_mask batch", dict(key_padding_mask=torch.zeros(3, L_, **BOOL)), ValueError, "key_padding_mask must have shape (batch, source length) = (2, 7), got (3, 7)"),
    ("1-D attn_mask", dict(attn_mask=torch.zeros(L_, **BOOL)), ValueError, "attn_mask must have shape (target length, source length) = (7, 7) or (batch * num_heads, target length, source length) = (8, 7, 7), got (7,)"),
    ("3-D attn_mask", dict(attn_mask=torch.zeros(3, L_, L_, **BOOL)), ValueError, "got (3, 7, 7)"),
    ("query embed dim", dict(query=torch.randn(L_, B_, 12)), ValueError, "query must have embedding dim 16 (last dim), got shape (7, 2, 12)"),
    ("key batch", dict(key=torch.randn(L_, 3, E_), value=torch.randn(L_, 3, E_)), ValueError, "key and value must have query's batch size 2 (dim 1), got 3"),
    ("input dtype", dict(query=X_MHA.double(), key=X_MHA.double(), value=X_MHA.double()), TypeError, "query must have the module's parameter dtype torch.float32, got torch.float64"),
    ("need_weights truthy", dict(need_weights="yes"), TypeError, "need_weights must be a bool, got 'yes' of type str"),
]


@pytest.mark.parametrize("name,kwargs,exc,message", MHA_CASES, ids=[c[0] for c in MHA_CASES])
def test_multihead_attention_bad_input_is_named(name, kwargs, exc, message):
    torch.manual_seed(0)
    args = {**dict(query=X_MHA, key=X_MHA, value=X_MHA, need_weights=False), **kwargs}
    ours = stfast.MultiheadAttention(E_, H_).eval()
    with pytest.raises(exc) as info:
        ours(**args)
    assert message in str(info.value)
    if name not in ("need_weights truthy",):
        theirs = torch.nn.MultiheadAttention(E_, H_).eval()
        with pytest.raises(Exception):
            theirs(**args)


FLAG_CASES = [
    ("return_lse truthy", lambda: stfast.attention(Q, K, V, return_lse="yes"), TypeError, "return_lse must be a bool, got 'yes' of type str"),
    ("is_causal truthy", lambda: stfast.scaled_dot_product_attention(Q, K, V, is_causal="yes"), TypeError, "is_causal must be a bool, got 'yes' of type str"),
    ("causal int", lambda: stfast.attention(Q, K, V, causal=1), TypeError, "causal must be False, True, 'top_left' or 'bottom_right', got 1 of type int"),
    ("causal float", lambda: stfast.attention(Q, K, V, causal=1.0), TypeError, "causal must be False, True, 'top_left' or 'bottom_right', got 1.0 of type float"),
    ("st causal int", lambda: stfast.spatiotemporal_attention(X, X, X, axis="time", causal=1), TypeError, "causal must be True or False, got 1 of type int"),
    ("dropout bool", lambda: stfast.scaled_dot_product_attention(Q, K, V, dropout_p=True), TypeError, "dropout_p must be a float in [0, 1], got True of type bool"),
    ("sdpa names key", lambda: stfast.scaled_dot_product_attention(Q, K.double(), V), TypeError, "key must have query's dtype torch.float32, got torch.float64"),
    ("sdpa names key dim", lambda: stfast.scaled_dot_product_attention(Q, K[..., :4], V), ValueError, "key's head dim must equal query's (8), got 4"),
    ("sdpa names value length", lambda: stfast.scaled_dot_product_attention(Q, K, V[:, :, :9]), ValueError, "value must have key's length 16, got 9"),
    ("st module backend", lambda: stfast.SpatioTemporalAttention(16, 4, backend="tpu"), ValueError, "backend must be one of ('auto', 'torch', 'triton', 'cuda'), got 'tpu'"),
    ("causal module backend", lambda: stfast.CausalSelfAttention(16, 4, backend="tpu"), ValueError, "backend must be one of ('auto', 'torch', 'triton', 'cuda'), got 'tpu'"),
    ("sparse module backend", lambda: stfast.BlockSparseSelfAttention(16, 4, LAYOUT, backend="tpu"), ValueError, "backend must be one of ('auto', 'torch', 'triton', 'cuda'), got 'tpu'"),
    ("mha backend", lambda: stfast.MultiheadAttention(16, 4, backend="tpu"), ValueError, "backend must be one of ('auto', 'torch', 'triton', 'cuda'), got 'tpu'"),
    ("cross module backend", lambda: stfast.SpatioTemporalCrossAttention(16, 4, backend="tpu"), ValueError, "backend must be one of ('auto', 'torch', 'triton', 'cuda'), got 'tpu'"),
    ("sparse module non-square layout", lambda: stfast.BlockSparseSelfAttention(16, 4, stfast.layouts.from_mask(torch.ones(16, 24, dtype=torch.bool), block=8)), ValueError, "layout must be square for self-attention (seq_len_k == seq_len_q), got seq_len_q=16, seq_len_k=24"),
    ("module causal_time truthy", lambda: stfast.SpatioTemporalAttention(16, 4, causal_time=1), TypeError, "causal_time must be a bool, got 1 of type int"),
    ("module dtype", lambda: stfast.SpatioTemporalAttention(16, 4)(torch.randn(2, 3, 5, 16, dtype=torch.float64)), TypeError, "x must have the module's parameter dtype torch.float32, got torch.float64"),
    ("causal module dtype", lambda: stfast.CausalSelfAttention(16, 4)(torch.randn(2, 5, 16, dtype=torch.float64)), TypeError, "x must have the module's parameter dtype torch.float32, got torch.float64"),
    ("spatial_mask named", lambda: stfast.SpatioTemporalAttention(16, 4)(torch.randn(2, 3, 5, 16), spatial_mask=torch.ones(4, 4, dtype=torch.bool)), ValueError, "spatial_mask must be broadcastable to [5, 5], got shape [4, 4]"),
    ("spatial_mask fits T", lambda: stfast.SpatioTemporalAttention(16, 4)(torch.randn(2, 20, 8, 16), spatial_mask=torch.ones(20, 20, dtype=torch.bool)), ValueError, "spatial_mask must be broadcastable to [8, 8], got shape [20, 20]: it fits [T, T] = [20, 20] instead; is x laid out [B, N, T, C] = [2, 20, 8, 16] instead of [B, T, N, C]?"),
]


@pytest.mark.parametrize("name,call,exc,message", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_flags_modules_and_names(name, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)
