"""Sequence-parallel SpatioTemporalAttention against the single-process module.

Each spawn runs many checks (spawning costs seconds): gloo on loopback, float64,
outputs and input/parameter gradients of every mode and strategy, uneven T and N.
"""

import copy
import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import stfast
from stfast import distributed as sd

pytestmark = pytest.mark.distributed

SPAWN_TIMEOUT_S = 120
TOL = dict(rtol=1e-9, atol=1e-11)
CASES = [(mode, causal) for mode in ("space", "time", "divided", "heads", "gated")
         for causal in ((False,) if mode == "space" else (False, True))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, check):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        globals()[check](rank, world)
    finally:
        dist.destroy_process_group()


def _spawn(check: str, world: int) -> None:
    ctx = mp.spawn(_worker, args=(world, _free_port(), check), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{check} on {world} ranks did not finish within {SPAWN_TIMEOUT_S} s")


def _modules(mode, causal, strategy, dim, heads, group=None, seed=0):
    torch.manual_seed(seed)
    ref = stfast.SpatioTemporalAttention(dim, heads, mode=mode, causal_time=causal).double()
    sp = sd.SequenceParallelSpatioTemporalAttention(dim, heads, mode=mode, causal_time=causal,
                                                    strategy=strategy, process_group=group).double()
    # Fresh random weights everywhere (biases included), identical on every rank.
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sp.load_state_dict(ref.state_dict())
    return ref, sp


def _space_mask(mode, n, gen):
    if mode == "time":
        return None
    mask = torch.rand(n, n, generator=gen) < 0.6
    return mask | torch.eye(n, dtype=torch.bool)


def _reference(ref, x, gy, mask):
    x = x.clone().requires_grad_()
    ref.zero_grad()
    y = ref(x, mask)
    (y * gy).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in ref.named_parameters()}


def _check_case(rank, world, mode, causal, strategy, shape, heads, seed, group=None):
    b, t, n, c = shape
    ref, sp = _modules(mode, causal, strategy, c, heads, group, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    gy = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = _space_mask(mode, n, gen)
    y_ref, gx_ref, gp_ref = _reference(ref, x, gy, mask)

    x_loc = x.tensor_split(world, 1)[rank].clone().requires_grad_()
    y_loc = sp(x_loc, mask)
    (y_loc * gy.tensor_split(world, 1)[rank]).sum().backward()
    what = f"mode={mode} causal={causal} strategy={strategy} shape={shape} world={world}"
    torch.testing.assert_close(y_loc, y_ref.tensor_split(world, 1)[rank], **TOL, msg=lambda m: f"{what} out: {m}")
    torch.testing.assert_close(x_loc.grad, gx_ref.tensor_split(world, 1)[rank], **TOL,
                               msg=lambda m: f"{what} dx: {m}")
    for name, p in sp.named_parameters():
        total = p.grad.clone()
        dist.all_reduce(total, group=group)  # each rank holds its shard's share
        torch.testing.assert_close(total, gp_ref[name], **TOL, msg=lambda m: f"{what} d{name}: {m}")


def _check_shard_gather(rank, world, strategy):
    """Full tensor in, full tensor out on every rank: shard / gather and their gradients."""
    shape = (2, 5, 7, 16)
    ref, sp = _modules("divided", True, strategy, 16, 4, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    gy = torch.randn(shape, generator=gen, dtype=torch.float64)
    y_ref, gx_ref, gp_ref = _reference(ref, x, gy, None)
    x_full = x.clone().requires_grad_()
    y = sd.gather(sp(sd.shard(x_full, 1)), 1)
    (y * gy).sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x_full.grad, gx_ref, **TOL)
    for name, p in sp.named_parameters():
        # the loss is replicated: each rank's share already counts it once
        total = p.grad.clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, gp_ref[name], **TOL)


def _check_bytes(rank, world):
    """The volumes the module docstring states, per rank and per forward."""
    b, t, n, c = 2, 2 * world, 3 * world, 16
    x_loc = torch.randn(b, 2, n, c, dtype=torch.float64)
    share = x_loc.numel() * x_loc.element_size()
    expected = {("dsp", "space"): 0, ("dsp", "time"): 2, ("dsp", "divided"): 2, ("dsp", "gated"): 2,
                ("dsp", "heads"): 1.5, ("ulysses", "space"): 4, ("ulysses", "time"): 4,
                ("ulysses", "divided"): 8, ("ulysses", "gated"): 8, ("ulysses", "heads"): 4}
    for (strategy, mode), factor in expected.items():
        _, sp = _modules(mode, False, strategy, c, 2 * world)
        with sd.count_comm() as counted:
            sp(x_loc)
        assert counted.all_to_all_bytes == factor * share, (strategy, mode, counted)
        assert counted.all_to_all_remote_bytes == factor * share * (world - 1) / world
        assert counted.all_gather_calls == 1


def _check_errors(rank, world):
    _, sp = _modules("divided", False, "dsp", 16, 4)
    n = 7 if rank == 0 else 6
    with pytest.raises(ValueError, match=r"same B, N and C.*rank 1 has \[B, T_local, N, C\] = \[2, 2, 6, 16\]"):
        sp(torch.randn(2, 2, n, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="same dtype"):
        sp(torch.randn(2, 2, 7, 16, dtype=torch.float64 if rank == 0 else torch.float32))
    with pytest.raises(ValueError, match="at least one frame"):
        sp(torch.randn(2, 1 - rank, 7, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"N must be >= world size {world}, got N=1"):
        sp(torch.randn(2, 2, 1, 16, dtype=torch.float64))
    _, sp = _modules("heads", False, "ulysses", 16, 2)
    with pytest.raises(ValueError, match=f"1 heads per attention, fewer than world size {world}"):
        sp(torch.randn(2, 2, 7, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape on every rank except along dim 1"):
        sd.gather(torch.randn(2, 3, 4 + rank), 1)


def check_two(rank, world):
    for strategy in ("dsp", "ulysses"):
        for i, (mode, causal) in enumerate(CASES):
            _check_case(rank, world, mode, causal, strategy, (2, 5, 7, 32), 8, seed=i)
        _check_case(rank, world, "divided", True, strategy, (1, 2, 2, 32), 4, seed=99)
        _check_shard_gather(rank, world, strategy)
    _check_bytes(rank, world)
    _check_errors(rank, world)


def check_four(rank, world):
    for strategy in ("dsp", "ulysses"):
        for i, (mode, causal) in enumerate(CASES):
            _check_case(rank, world, mode, causal, strategy, (2, 5, 7, 32), 8, seed=i)
    # 6 heads over 4 ranks: 2, 2, 1, 1 heads per rank
    _check_case(rank, world, "gated", True, "ulysses", (1, 6, 5, 24), 6, seed=50)
    _check_ddp_subgroups(rank, world)


def _check_ddp_subgroups(rank, world):
    """2 data-parallel replicas x 2 sequence-parallel ranks under DDP over all 4 ranks."""
    sp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    replica, sp_rank = divmod(rank, 2)
    group = sp_groups[replica]
    shape = (2, 5, 6, 32)
    for strategy, mode in (("dsp", "divided"), ("ulysses", "gated"), ("dsp", "heads")):
        ref, sp = _modules(mode, True, strategy, 32, 4, group, seed=70)
        assert copy.deepcopy(sp).process_group is group  # EMA copies share the group
        model = DistributedDataParallel(sp)
        inputs = []
        for r in range(2):
            gen = torch.Generator().manual_seed(100 + r)
            inputs.append((torch.randn(shape, generator=gen, dtype=torch.float64),
                           torch.randn(shape, generator=gen, dtype=torch.float64)))
        refs = [_reference(ref, x, gy, None) for x, gy in inputs]
        x, gy = inputs[replica]
        x_loc = x.tensor_split(2, 1)[sp_rank].clone().requires_grad_()
        y_loc = model(x_loc)
        (y_loc * gy.tensor_split(2, 1)[sp_rank]).sum().backward()
        y_ref, gx_ref, _ = refs[replica]
        torch.testing.assert_close(y_loc, y_ref.tensor_split(2, 1)[sp_rank], **TOL)
        torch.testing.assert_close(x_loc.grad, gx_ref.tensor_split(2, 1)[sp_rank], **TOL)
        for name, p in sp.named_parameters():
            # DDP averages over the 4 ranks; the two SP ranks of a replica hold its shares
            expected = (refs[0][2][name] + refs[1][2][name]) / world
            torch.testing.assert_close(p.grad, expected, **TOL, msg=lambda m: f"{strategy} d{name}: {m}")
    other = sp_groups[1 - replica]
    _, sp = _modules("divided", False, "dsp", 32, 4, other)
    with pytest.raises(RuntimeError, match="not a member of process_group"):
        sp(torch.randn(2, 2, 6, 32, dtype=torch.float64))


def test_two_ranks():
    _spawn("check_two", 2)


def test_four_ranks():
    _spawn("check_four", 4)


def test_errors_without_process_group():
    sp = sd.SequenceParallelSpatioTemporalAttention(16, 4, mode="divided")
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        sp(torch.randn(1, 2, 3, 16))
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        sd.shard(torch.randn(1, 2, 3, 16), 1)
    with pytest.raises(ValueError, match="mode='joint' cannot be sequence-parallel"):
        sd.SequenceParallelSpatioTemporalAttention(16, 4, mode="joint")
    with pytest.raises(ValueError, match=r"strategy must be one of \('dsp', 'ulysses'\), got 'ring'"):
        sd.SequenceParallelSpatioTemporalAttention(16, 4, mode="time", strategy="ring")
    with pytest.raises(ValueError, match="mode must be one of"):
        sd.SequenceParallelSpatioTemporalAttention(16, 4, mode="spacetime")


def test_state_dict_loads_both_ways():
    torch.manual_seed(0)
    for mode in ("space", "time", "divided", "heads", "gated"):
        ref = stfast.SpatioTemporalAttention(16, 4, mode=mode)
        sp = sd.SequenceParallelSpatioTemporalAttention(16, 4, mode=mode, strategy="ulysses")
        assert sp.state_dict().keys() == ref.state_dict().keys()
        for p in sp.parameters():
            torch.nn.init.normal_(p)
        ref.load_state_dict(sp.state_dict())
        for (name, a), b in zip(ref.state_dict().items(), sp.state_dict().values()):
            assert torch.equal(a, b), name
