"""Sequence-parallel divided space-time attention, trained for a few steps on every
process of a torchrun job: gloo on CPU, NCCL on GPUs, the same script.

    torchrun --nproc_per_node=2 examples/sequence_parallel.py            # 2 sequence ranks
    torchrun --nproc_per_node=4 examples/sequence_parallel.py --dp 2     # 2 replicas x 2 sequence ranks

Each replica (``--dp`` of them) owns one batch; its sequence ranks each hold a share of
the frames and exchange them with one all-to-all each way per time pass.
DistributedDataParallel averages the gradients over every process.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from stfast.distributed import SequenceParallelSpatioTemporalAttention, gather, shard


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (default 1)")
    p.add_argument("--shape", default="2,8,196,256", help="B,T,N,C of each replica's batch")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    return p.parse_args()


def main():
    args = parse_args()
    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # The processes of one machine share its cores; oversubscribing them makes every
        # collective wait for the slowest rank.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if args.dp < 1 or world % args.dp:
        raise SystemExit(f"--dp must divide the number of processes ({world}), got {args.dp}")
    mesh = init_device_mesh(device.type, (args.dp, world // args.dp), mesh_dim_names=("dp", "sp"))
    sp = mesh["sp"].get_group()
    b, t, n, c = (int(x) for x in args.shape.split(","))

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts them)
    layer = SequenceParallelSpatioTemporalAttention(c, args.heads, mode="divided", causal_time=True,
                                                    process_group=sp, strategy="dsp").to(device)
    model = DDP(layer, device_ids=[device.index] if on_gpu else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # One batch per replica, the same on each of its sequence ranks.
    gen = torch.Generator().manual_seed(1 + mesh["dp"].get_local_rank())
    x = torch.randn(b, t, n, c, generator=gen).to(device)
    target = torch.randn(b, t, n, c, generator=gen).to(device)
    x_local, target_local = shard(x, dim=1, group=sp), shard(target, dim=1, group=sp)

    for step in range(args.steps):
        start = time.perf_counter()
        y_local = model(x_local)  # this rank's frames in, this rank's frames out
        loss = (y_local.float() - target_local).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        losses = [None] * world
        dist.all_gather_object(losses, round(loss.item(), 5))
        if rank == 0:
            print(f"step {step}: loss per rank {losses}, {ms:.0f} ms on rank 0")

    y = gather(y_local.detach(), dim=1, group=sp)  # the replica's full [B, T, N, C] output
    if rank == 0:
        print(f"{world} processes ({dist.get_backend()}, {device.type}), mesh dp={args.dp} x sp={world // args.dp}: "
              f"input {tuple(x.shape)}, this rank's frames {tuple(x_local.shape)}, "
              f"gathered output {tuple(y.shape)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
