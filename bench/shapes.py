"""The problems the benchmark runs: shapes users have (causal LLMs, video
transformers, traffic graphs, sparse video generation), grouped into presets, and the inputs and FLOP counts of each.

A :class:`Case` is one problem (shape, kind, mask); every competitor of the run gets
the same inputs.  Dense and causal inputs are contiguous ``[B, H, L, D]`` (the
layout SDPA code is written for); spatio-temporal inputs are the q/k/v slices of a
fused ``[B, T, N, 3, H, D]`` projection, as a model produces them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

SUITES = ("causal", "spatiotemporal", "block_sparse", "distributed")


@dataclass
class Case:
    suite: str
    name: str
    pclass: str  # stfast.backends.problem_class: dense | causal | space | time | block_sparse
    shape: dict  # B, H, L, D (dense kinds) or B, T, N, H, D (spatio-temporal)
    layout: tuple | None = None  # (builder name in stfast.layouts, kwargs)
    flex: bool = True  # worth a FlexAttention row (its compile is slow on CPU)
    unfused: bool = True  # worth SDPA's math backend rows (slow and memory-hungry on CPU)
    _built: object = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.name}"

    @property
    def spatiotemporal(self) -> bool:
        return self.pclass in ("space", "time")

    def build_layout(self):
        """The :class:`stfast.BlockLayout` of a block-sparse case (built once)."""
        if self.layout is None:
            return None
        if self._built is None:
            import stfast.layouts

            builder, kwargs = self.layout
            fn = getattr(stfast.layouts, builder, None)
            if fn is None:
                raise LookupError(f"stfast.layouts.{builder} does not exist (yet)")
            self._built = fn(**kwargs)
        return self._built

    @property
    def density(self) -> float | None:
        """Block density of a block-sparse case, once its layout is built."""
        return None if self._built is None else self._built.density

    def visible_pairs(self) -> int:
        """(query, key) pairs that attention computes, over the whole batch."""
        s = self.shape
        if self.spatiotemporal:
            length = s["N"] if self.pclass == "space" else s["T"]
            seqs = s["B"] * s["H"] * (s["T"] if self.pclass == "space" else s["N"])
            return seqs * length * length
        heads = s["B"] * s["H"]
        if self.pclass == "causal":
            return heads * s["L"] * (s["L"] + 1) // 2
        if self.pclass == "block_sparse":
            lay = self.build_layout()
            return heads // lay.num_heads * lay.visible_pairs()
        return heads * s["L"] * s["L"]

    def flops(self, pass_: str) -> float:
        """4 * pairs * D forward (two matmuls); backward 2.5x forward."""
        fwd = 4.0 * self.visible_pairs() * self.shape["D"]
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_]

    def describe(self) -> str:
        s = self.shape
        dims = "BTNHD" if self.spatiotemporal else "BHLD"
        text = " ".join(f"{d}={s[d]}" for d in dims)
        if self.layout is not None:
            builder, kwargs = self.layout
            text += f" {builder}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        return text


class Inputs:
    """Random leaves of a case and the q, k, v views a call receives."""

    def __init__(self, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        s = case.shape
        self.case = case
        if case.spatiotemporal:
            shape = (s["B"], s["T"], s["N"], 3, s["H"], s["D"])
            self.leaves = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype)]
        else:
            shape = (s["B"], s["H"], s["L"], s["D"])
            self.leaves = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                           for _ in range(3)]

    def qkv(self, leaves=None):
        leaves = self.leaves if leaves is None else leaves
        if self.case.spatiotemporal:
            return leaves[0].unbind(3)
        return tuple(leaves)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """What the model does next with an output: spatio-temporal outputs become
        ``[B, T, N, H*D]`` for the output projection (a copy unless contiguous)."""
        if self.case.spatiotemporal:
            return out.reshape(*out.shape[:3], -1)
        return out


def _llm(suite, pclass, lengths, dims, tokens, width, flex=True):
    cases = []
    for d in dims:
        for length in lengths:
            b, h = max(1, tokens // length), width // d
            prefix = "llm-causal" if pclass == "causal" else "dense"
            cases.append(Case(suite, f"{prefix} L={length} D={d}", pclass,
                              dict(B=b, H=h, L=length, D=d), flex=flex))
    return cases


def _st(prefix, b, t, n, h, d):
    return [Case("spatiotemporal", f"{prefix} {axis} N={n} D={d}", axis, dict(B=b, T=t, N=n, H=h, D=d),
                 flex=False)
            for axis in ("space", "time")]


def _sparse(name, builder, kwargs, b, h, d, flex=True):
    length = kwargs.get("seq_len") or math.prod(kwargs["grid"])
    return Case("block_sparse", name, "block_sparse", dict(B=b, H=h, L=length, D=d),
                layout=(builder, kwargs), flex=flex)


def _presets() -> dict[str, list[Case]]:
    llm = (_llm("causal", "causal", (1024, 2048, 4096, 8192, 16384), (64, 128), 16384, 2048)
           + _llm("causal", "dense", (1024, 4096, 16384), (64, 128), 16384, 2048))
    video = _st("video", 2, 16, 1024, 16, 64) + _st("video", 2, 16, 1024, 16, 72)
    timesformer = _st("timesformer", 8, 8, 196, 12, 64)
    traffic = (_st("traffic", 64, 12, 207, 8, 8) + _st("traffic", 64, 12, 325, 4, 38)
               + _st("traffic", 64, 12, 883, 4, 38))
    sparse3d = [_sparse("tiles3d (16,32,32)", "sliding_tile_3d",
                        dict(grid=(16, 32, 32), tile=(4, 4, 4), window=(3, 3, 3)), 2, 16, 64)]
    sparse1d = ([_sparse(f"local L={n}", "local", dict(seq_len=n, window=1024, block=64), 1, 16, 64)
                 for n in (8192, 16384, 32768, 65536)]
                + [_sparse(f"bigbird L={n}", "bigbird",
                           dict(seq_len=n, num_global=2, num_window=3, num_random=3, block=64), 1, 16, 64)
                   for n in (16384, 65536)])
    cpu_full = (
        _llm("causal", "causal", (512, 1024, 2048), (64,), 4096, 512, flex=False)
        + _llm("causal", "causal", (1024,), (128,), 4096, 512)
        + _llm("causal", "dense", (1024,), (64,), 4096, 512, flex=False)
        + _st("video", 1, 8, 256, 8, 72) + _st("timesformer", 1, 8, 196, 12, 64)
        + _st("traffic", 8, 12, 207, 8, 8) + _st("traffic", 2, 12, 883, 4, 38)
        + [_sparse("local L=4096 (10%)", "local", dict(seq_len=4096, window=192, block=64), 1, 4, 64),
           _sparse("bigbird L=2048", "bigbird",
                   dict(seq_len=2048, num_global=1, num_window=3, num_random=2, block=64), 1, 4, 64,
                   flex=False),
           _sparse("tiles3d (8,16,16)", "sliding_tile_3d",
                   dict(grid=(8, 16, 16), tile=(2, 4, 8), window=(3, 3, 1)), 1, 4, 64, flex=False)])
    # The default CPU sweep: one case of each kind of cpu-full, without SDPA's math rows
    # (a third of cpu-full's time), to finish in about 3 minutes on 2 cores.
    quick = {"llm-causal L=1024 D=64", "llm-causal L=1024 D=128", "dense L=1024 D=64",
             "local L=4096 (10%)", "tiles3d (8,16,16)"}
    cpu = [dataclasses.replace(c, unfused=False) for c in cpu_full
           if c.spatiotemporal or c.name in quick]
    return {
        "cpu": cpu, "cpu-full": cpu_full,
        "full": llm + video + timesformer + traffic + sparse3d + sparse1d,
        "llm": llm, "video": video, "timesformer": timesformer, "traffic": traffic,
        "sparse3d": sparse3d, "sparse1d": sparse1d,
    }


PRESETS = _presets()


def select(preset: str, suites: tuple[str, ...]) -> list[Case]:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return [c for c in PRESETS[preset] if c.suite in suites]
