"""DESIGN §2/§6: memory beyond inputs, outputs and the user's own mask is O(L) on every
path of the torch backend.  A dispatch-mode watch records the largest tensor any
operation produces (SDPA's own mask conversion included) during forward and backward;
no tensor may scale with Lq * Lk beyond the user's mask (inputs are
O(B * H * L * D), sized here below Lq * Lk)."""

import pytest
import torch

import stfast

from helpers import LargestAllocation


def _largest(fn, *inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    with LargestAllocation() as watch:
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.randn_like(out))
    return watch.largest


def _qkv(b, h, lq, lk, d=16):
    return torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_and_top_left_causal(causal):
    q, k, v = _qkv(2, 2, 384, 384)
    largest = _largest(lambda a, b, c: stfast.attention(a, b, c, causal=causal, backend="torch"), q, k, v)
    assert largest < 384 * 384, f"a tensor of {largest} elements (Lq*Lk = {384 * 384})"


# (1024, 4096): KV-cache prefill by chunks, Lk >= 2 Lq, where chunks of rows carry a
# causal mask of their own (a bounded number of elements, far below Lq * Lk here).
@pytest.mark.parametrize("lq,lk", [(368, 384), (384, 368), (1024, 4096)])
def test_bottom_right_causal_never_allocates_lq_by_lk(lq, lk):
    q, k, v = _qkv(2, 2, lq, lk)
    largest = _largest(lambda a, b, c: stfast.attention(a, b, c, causal="bottom_right", backend="torch"),
                       q, k, v)
    assert largest < lq * lk, f"a tensor of {largest} elements (Lq*Lk = {lq * lk})"


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_user_mask_is_not_expanded_over_batch_and_heads(kind):
    b, h, length = 2, 3, 256
    q, k, v = _qkv(b, h, length, length)
    mask = torch.rand(length, length) > 0.5
    if kind == "float":
        mask = torch.randn(length, length).masked_fill(~mask, float("-inf"))
    largest = _largest(lambda a, b_, c: stfast.scaled_dot_product_attention(a, b_, c, attn_mask=mask,
                                                                            backend="torch"), q, k, v)
    assert largest <= length * length, \
        f"a tensor of {largest} elements, the user's mask has {length * length} (B*H*L*L = {b * h * length ** 2})"


def test_graph_masked_spatial_pass_processes_the_mask_once():
    b, t, n, h, d = 2, 3, 97, 2, 8
    q, k, v = (torch.randn(b, t, n, h, d) for _ in range(3))
    adjacency = torch.rand(n, n) > 0.7
    largest = _largest(lambda a, b_, c: stfast.spatiotemporal_attention(a, b_, c, axis="space",
                                                                        attn_mask=adjacency,
                                                                        backend="torch"), q, k, v)
    assert largest <= max(n * n, b * t * n * h * d), \
        f"a tensor of {largest} elements; mask {n * n}, B*T*H*N*N = {b * t * h * n * n}"


def test_time_pass_and_block_sparse():
    q, k, v = (torch.randn(2, 64, 5, 2, 8) for _ in range(3))
    largest = _largest(lambda a, b, c: stfast.spatiotemporal_attention(a, b, c, axis="time", causal=True,
                                                                       backend="torch"), q, k, v)
    assert largest <= q.numel()
    length = 1024
    layout = stfast.layouts.local(length, window=64, block=32)
    q, k, v = _qkv(1, 2, length, length)
    largest = _largest(lambda a, b, c: stfast.block_sparse_attention(a, b, c, layout, backend="torch"), q, k, v)
    assert largest < length * length, f"a tensor of {largest} elements (L*L = {length * length})"




def test_sdpa_kv_batch_broadcast_is_never_copied():
    # PyTorch's SDPA broadcasts batch dims; stfast passes k/v of batch 1 on as stride-0
    # views.  They are the long tensors here, so a batch-sized copy of them would be the
    # largest tensor of the call by far.
    q = torch.randn(4, 2, 16, 64)
    k, v = torch.randn(1, 2, 1024, 64), torch.randn(1, 2, 1024, 64)
    with LargestAllocation() as watch:
        out = stfast.scaled_dot_product_attention(q, k, v, backend="torch")
    assert out.shape == (4, 2, 16, 64)
    assert watch.largest <= k.numel(), f"a tensor of {watch.largest} elements: k/v were copied"
