"""Compile every Triton configuration the launcher can select, for sm_80 and sm_90,
without a GPU, and check what only the GPU toolchain knows: shared memory and spills.

For each arch, dtype (bfloat16, float16, float32 as TF32) and head-dim bucket, the
launchers run on CPU tensors with the device's shared-memory limit patched in and
the kernels' ``run`` replaced by a recorder.  Every recorded launch is then compiled
for every configuration the pruner keeps (:func:`stfast.triton.launch.selectable`),
with the JIT's own argument specialisation (divisibility and ``== 1`` attributes,
``do_not_specialize``), through Triton's toolchain (ptxas ships in the wheel).
Registers and spills come from ptxas' report, shared memory from the kernel metadata.

Checks: shared memory within the target's opt-in limit for every selectable
configuration, and no spills on bfloat16/float16 paths with head dims <= 128.

Compiling takes 5-15 s per kernel on a small CPU, so results are cached in
``triton_aot_cache.json`` beside this file, keyed on the kernel's source hash
(``JITFunction.cache_key``: the kernel and every function it calls), the Triton
version, the target and the full specialisation; a changed kernel or Triton is
recompiled, stale entries are dropped.  ``--no-cache`` compiles everything;
``--all`` also compiles the configurations the pruner rejects (for calibrating
:mod:`stfast.triton.resources`; nothing is asserted about those).

Run as a script (``tests/test_triton_build.py`` does, in a subprocess without
``TRITON_INTERPRET``); prints the table and exits non-zero on a violation.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, without its warning
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a hit in Triton's own cache would skip ptxas and its report

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from stfast.lowering import lower  # noqa: E402
from stfast.triton import kernels, launch, resources  # noqa: E402

SMEM_LIMIT = {80: 166_912, 90: 232_448}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (16, 32, 64, 128, 256)
NO_SPILL_MAX_D = 128
CACHE = Path(__file__).with_name("triton_aot_cache.json")
KERNEL_NAMES = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq",
                "_packed_fwd_kernel": "packed_fwd", "_packed_bwd_kernel": "packed_bwd",
                "_bwd_preprocess": "preprocess"}

launches = []


# The packed kernels are launched with the warps the launcher picks from the table;
# both candidates are compiled (so that the table knows both), marked selected only
# when the launcher would pick them.
_PACKED_WARPS = (4, 8)
_packed = {"forced": None, "chosen": {}}


def _record_autotuned(self, *args, grid, warmup=False, **kwargs):
    launches.append((self.fn, args, kwargs, True, True))


def _record_plain(self, *args, grid, warmup, **kwargs):
    name = KERNEL_NAMES[self.__name__]
    selected = name not in _packed["chosen"] or _packed["chosen"][name] == kwargs.get("num_warps")
    launches.append((self, args, kwargs, False, selected))


def _forcing_packed_warps(real):
    def packed_warps(p, kernel, target):
        chosen = real(p, kernel, target)
        if _packed["forced"] is None or p.layout is not None or p.groups != 1 \
                or max(p.lq, p.lk) > launch.PACK_MAX_LEN:
            return chosen
        _packed["chosen"][kernel] = chosen
        return _packed["forced"]
    return packed_warps


def _problems(dtype, d):
    """Problems that launch every kernel at head dim ``d``, with and without an element
    mask (the pruner keys on it): causal dense problems (tiled kernels) and causal time
    axes of T=16 (packed kernels)."""
    q = torch.randn(1, 2, 300, d, dtype=dtype)
    yield "dense", q, q, q, dict(causal="top_left")
    mask = (torch.rand(300, 300) > 0.5).expand(1, 2, 300, 300)
    yield "dense", q, q, q, dict(causal="top_left", mask=mask)
    x = torch.randn(1, 16, 5, 2, d, dtype=dtype)
    yield "time", x, x, x, dict(causal="top_left")
    yield "time", x, x, x, dict(causal="top_left", mask=torch.rand(16, 16) > 0.5)


def specialize(fn, args, kwargs, arch):
    """The JIT's own specialisation of a launch for target ``sm_<arch>``: the code
    path of ``JITFunction.run`` (binder, then ``_pack_args``)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def _jobs(select_all):
    """(label fields, compile spec) for every configuration that can be selected."""
    jobs = []
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs on a GPU only as TF32
    Autotuner.run = _record_autotuned
    JITFunction.run = _record_plain
    launch.packed_warps = _forcing_packed_warps(launch.packed_warps)
    for arch, limit in SMEM_LIMIT.items():
        target = resources.Target(arch, limit)
        launch.device_target = lambda device, target=target: target
        for dname, dtype in DTYPES.items():
            for d in HEAD_DIMS:
                del launches[:]
                for kind, q, k, v, kw in _problems(dtype, d):
                    for forced in _PACKED_WARPS if kind == "time" else (None,):
                        _packed.update(forced=forced, chosen={})
                        p = lower(kind, q, k, v, scale=d ** -0.5, **kw)
                        _, out5 = p.new_output()
                        lse5 = p.new_lse()
                        launch.forward(p, out5, lse5)
                        (_, dq5), (_, dk5), (_, dv5) = p.new_grads(q, k, v)
                        launch.backward(p, out5, torch.randn_like(out5), lse5, dq5, dk5, dv5)
                _packed.update(forced=None, chosen={})
                seen = set()
                for fn, args, kwargs, tuned, plain_selected in launches:
                    name = KERNEL_NAMES[fn.__name__]
                    masked = bool(kwargs.get("HAS_MASK", False))
                    variants = [(dict(kwargs), plain_selected)]
                    if tuned:
                        kept = launch.selectable(name, dtype, kwargs["D_PAD"], kwargs["DV_PAD"], kwargs["LB"],
                                                 target, launch.GPU_CONFIGS[name], masked)
                        configs = launch.GPU_CONFIGS[name] if select_all else kept
                        variants = [({**kwargs, **c.all_kwargs()}, c in kept) for c in configs]
                    for full, selected in variants:
                        spec = specialize(fn, args, full, arch)
                        options = spec[3]
                        tile = (full.get("BLOCK_M", 0), full.get("BLOCK_N", 0), options.num_warps,
                                options.num_stages)
                        if (name, masked, tile) in seen:
                            continue
                        seen.add((name, masked, tile))
                        jobs.append(dict(arch=arch, dtype=dname, d=d, kernel=name, fn=fn.__name__, tile=tile,
                                         masked=masked, selected=selected, d_pad=full.get("D_PAD", full["DV_PAD"]),
                                         dv_pad=full["DV_PAD"], spec=spec))
    return jobs


def _key(job):
    fn = getattr(kernels, job["fn"])
    signature, constexprs, attrs, options = job["spec"]
    # Options name libdevice by its path inside this environment; only its name belongs in
    # a key that a fresh checkout in another environment must find again.
    opts = {**options.__dict__, "extern_libs": tuple((name, os.path.basename(path))
                                                     for name, path in options.extern_libs or ())}
    text = repr((fn.cache_key, triton.__version__, job["arch"], sorted(signature.items()),
                 sorted(constexprs.items()), sorted(attrs.items()), sorted(opts.items())))
    return hashlib.sha256(text.encode()).hexdigest()


def _compile(job):
    signature, constexprs, attrs, options = job["spec"]
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn=getattr(kernels, job["fn"]), signature=signature,
                                          constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", job["arch"], 32), options=options.__dict__)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas report for {job['fn']}: {text[-2000:]}")
    return dict(regs=int(regs.group(1)), spills=int(spills.group(1)), smem=kernel.metadata.shared)


def _write_table(table):
    path = Path(resources.__file__).with_name("_measured.py")
    head = path.read_text().split("MEASURED = ")[0]
    lines = [f"    {k!r}: {v!r}," for k, v in sorted(table.items())]
    path.write_text(head + "MEASURED = {\n" + "\n".join(lines) + "\n}\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-cache", action="store_true", help="compile everything, ignore the cache")
    parser.add_argument("--all", action="store_true", help="also compile configs the pruner rejects")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write-table", action="store_true",
                        help="record this run's results in stfast/triton/_measured.py (the pruner's table)")
    parser.add_argument("--only", default="", help="comma-separated filters, e.g. sm_90,bf16,128,fwd")
    opts = parser.parse_args()
    start = time.time()
    only = [f for f in opts.only.split(",") if f]
    jobs = [j for j in _jobs(opts.all)
            if all(f in (f"sm_{j['arch']}", j["dtype"], str(j["d"]), j["kernel"],
                         "masked" if j["masked"] else "unmasked") for f in only)]
    cache = {}
    if not opts.no_cache and CACHE.exists():
        cache = json.loads(CACHE.read_text()).get("entries", {})
    keys = [_key(j) for j in jobs]
    todo = [(k, j) for k, j in zip(keys, jobs) if k not in cache]
    fresh = {}

    def save(entries, merge=True):
        # Another run may have written meanwhile: keep its entries too.
        if merge and CACHE.exists():
            entries = {**json.loads(CACHE.read_text()).get("entries", {}), **entries}
        tmp = CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps({"triton": triton.__version__, "entries": entries}, indent=0,
                                  sort_keys=True) + "\n")
        tmp.replace(CACHE)

    if todo:
        with ProcessPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
            for n, ((k, job), result) in enumerate(zip(todo, pool.map(_compile, [j for _, j in todo])), 1):
                fresh[k] = result
                print(f"[{n}/{len(todo)}] sm_{job['arch']} {job['kernel']} mask={job['masked']} {job['dtype']} "
                      f"D={job['d']} {job['tile']}: {result}", file=sys.stderr, flush=True)
                if n % 10 == 0:  # a long cold run keeps what it has compiled
                    save(fresh)
    results = {**cache, **fresh}
    if only or opts.all:
        if fresh:
            save(fresh)
    elif set(cache) != set(keys) or fresh:
        save({k: results[k] for k in set(keys)}, merge=False)  # a full run keeps what it used
    failures = []
    table = dict(resources.MEASURED)
    print(f"{'arch':<6}{'kernel':<12}{'mask':<5}{'dtype':<6}{'D':>4} {'BM,BN,warps,stages':<20}{'regs':>5}"
          f"{'spills':>8}{'smem':>9}{'est smem':>11}{'est regs':>11}  selected")
    for key, job in zip(keys, jobs):
        r = results[key]
        bm, bn, warps, stages = job["tile"]
        model = ""
        if job["kernel"] in resources.KERNELS:
            est = resources.estimate(job["kernel"], DTYPES[job["dtype"]].itemsize, job["d_pad"], job["dv_pad"],
                                     resources.Tile(bm, bn, warps, stages), job["masked"])
            model = f"{est.smem:>11}{est.registers:>11}"
        print(f"sm_{job['arch']:<3}{job['kernel']:<12}{'yes' if job['masked'] else 'no':<5}{job['dtype']:<6}"
              f"{job['d']:>4} {f'{bm},{bn},{warps},{stages}':<20}{r['regs']:>5}{r['spills']:>8}{r['smem']:>9}"
              f"{model:<22}  {'yes' if job['selected'] else 'no'}")
        where = (f"sm_{job['arch']} {job['kernel']}{' masked' if job['masked'] else ''} {job['dtype']} "
                 f"D={job['d']} tile {job['tile']}")
        if job["kernel"] in resources.KERNELS:
            entry = (job["arch"], job["kernel"], job["masked"], job["dtype"], max(job["d_pad"], job["dv_pad"]),
                     *job["tile"])
            measured = (r["regs"], r["spills"], r["smem"])
            if opts.write_table:
                table[entry] = measured
            elif job["selected"] and resources.MEASURED.get(entry) != measured:
                failures.append(f"{where}: the pruner's table says {resources.MEASURED.get(entry)}, the compiler "
                                f"{measured} (regs, spills, smem): run tests/triton_aot.py --write-table")
        if not job["selected"]:
            continue
        if r["smem"] > SMEM_LIMIT[job["arch"]]:
            failures.append(f"{where}: {r['smem']} B shared > {SMEM_LIMIT[job['arch']]}")
        if job["dtype"] != "fp32" and job["d"] <= NO_SPILL_MAX_D and r["spills"]:
            failures.append(f"{where}: {r['spills']} B of register spills")
    if opts.write_table:
        _write_table(table)
    print(f"compiled {len(fresh)} kernels, {len(jobs) - len(todo)} from the cache, {len(jobs)} checked "
          f"in {time.time() - start:.0f} s")
    if failures:
        print("violations:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
