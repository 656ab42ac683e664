"""``python -m stfast``: versions, devices, the backend setting, and which backends work
here and why not.  ``python -m stfast --selftest``: every available backend on this
device against the float64 oracle of the torch backend, as a table and a JSON file to
attach to a bug report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def _preference_line() -> str:
    from . import backends

    raw = os.environ.get("STFAST_BACKEND")
    if raw is None or not raw.strip():
        return "STFAST_BACKEND: unset (auto)"
    try:
        name = backends.env_preference()
    except ValueError as exc:
        return f"STFAST_BACKEND: invalid: {exc}"
    if name == "auto":
        return "STFAST_BACKEND=auto: auto"
    reason = backends.available()[name]
    if reason is None:
        return f"STFAST_BACKEND={raw}: prefers {name!r}, which is available (problems it cannot run fall back)"
    return f"STFAST_BACKEND={raw}: prefers {name!r}, which is unavailable here ({reason}); calls use auto"


def report() -> str:
    from . import __version__, backends

    lines = [f"stfast {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), "
                         f"CUDA {torch.version.cuda}")
    else:
        lines.append("no CUDA device: kernels fall back to the torch backend")
    lines.append(_preference_line())
    lines.append("backends:")
    for name, reason in backends.available().items():
        lines.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
        if name == "cuda":
            from . import cuda

            lines.append(f"          extension: {cuda.status()}")
    return "\n".join(lines)


# ---- self-test ---------------------------------------------------------------------

_EPS = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def _cases(head_dims, dtypes, device):
    """(name, dtype, fn(q, k, v, backend) -> out, shapes) over the problem kinds."""
    import stfast
    from stfast import layouts

    def rnd(*shape, dtype):
        return torch.randn(*shape, dtype=dtype, device=device)

    for dtype in dtypes:
        for d in head_dims:
            tag = f"{str(dtype).replace('torch.', '')} D={d}"
            yield f"dense {tag}", lambda: [rnd(1, 2, 37, d, dtype=dtype) for _ in range(3)], \
                lambda q, k, v, b: stfast.attention(q, k, v, backend=b)
            for causal in ("top_left", "bottom_right"):
                yield f"causal {causal} GQA Lq!=Lk {tag}", \
                    lambda: [rnd(1, 4, 29, d, dtype=dtype), rnd(1, 2, 45, d, dtype=dtype),
                             rnd(1, 2, 45, d, dtype=dtype)], \
                    lambda q, k, v, b, c=causal: stfast.attention(q, k, v, causal=c, backend=b)
        d = head_dims[0]
        tag = f"{str(dtype).replace('torch.', '')} D={d}"

        def fused(dtype=dtype, d=d):
            qkv = rnd(1, 6, 11, 3, 2, d, dtype=dtype)
            return [qkv[:, :, :, i] for i in range(3)]

        for axis in ("time", "space"):
            yield f"spatio-temporal view axis={axis} {tag}", fused, \
                lambda q, k, v, b, a=axis: stfast.spatiotemporal_attention(q, k, v, axis=a, causal=a == "time",
                                                                            backend=b)
        mask = torch.rand(40, 40, device=device) > 0.4
        mask[3] = False
        yield f"bool mask with an empty row {tag}", lambda: [rnd(1, 2, 40, d, dtype=dtype) for _ in range(3)], \
            lambda q, k, v, b: stfast.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=b)
        layout = layouts.local(64, window=20, block=16)
        yield f"block-sparse local window {tag}", lambda: [rnd(1, 2, 64, d, dtype=dtype) for _ in range(3)], \
            lambda q, k, v, b: stfast.block_sparse_attention(q, k, v, layout, backend=b)


def _error_ratio(fn, make, backend):
    """max |error| of ``backend`` over out, dq, dk, dv against the float64 oracle (the
    torch backend's plain math), divided by the bound: twice the error of the same
    plain math at the inputs' dtype, plus a small epsilon."""
    from .backends import lower_call
    from .lowering import from5
    from .reference import oracle

    inputs = [t.detach() for t in make()]
    dtype = inputs[0].dtype

    def grads(out, leaves):
        out.backward(dout.to(out.dtype))
        return [out.detach().double()] + [t.grad.double() for t in leaves]

    def plain(tensors, compute_dtype):
        leaves = [t.clone().requires_grad_() for t in tensors]
        p = lower_call(lambda: fn(*leaves, "torch"), track_grad=True)
        return grads(from5(oracle(p, dtype=compute_dtype)[0], p.kind), leaves)

    with torch.no_grad():
        shape = fn(*inputs, "torch").shape
    dout = torch.randn(shape, dtype=torch.float64, device=inputs[0].device)
    exact = plain([t.double() for t in inputs], torch.float64)
    at_dtype = plain(inputs, dtype)
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = grads(fn(*leaves, backend), leaves)
    worst = 0.0
    for g, p, e in zip(got, at_dtype, exact):
        if not torch.isfinite(g).all():
            return float("inf")
        bound = 2 * (p - e).abs().max().item() + _EPS[dtype]
        worst = max(worst, (g - e).abs().max().item() / bound)
    return worst


def selftest(*, interpret: bool = False, json_path: str | None = "stfast-selftest.json",
             head_dims=(64, 72, 128), out=sys.stdout) -> dict:
    """Run the self-test; return (and write to ``json_path``) its results."""
    if interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("note: triton was imported before TRITON_INTERPRET=1 could be set", file=out)
        os.environ["TRITON_INTERPRET"] = "1"
    from . import __version__, backends

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    status = backends.available()
    not_checked = []
    runnable = []
    for name, reason in status.items():
        if name != "torch" and not cuda:
            if name == "triton" and interpret and reason is None:
                runnable.append(name)
            elif name == "triton" and not interpret:
                not_checked.append("triton: no GPU; pass --interpret to run its kernels under the "
                                   "Triton interpreter (slow, float32 only)")
            else:
                not_checked.append(f"{name}: {reason or 'needs a CUDA GPU'}")
        elif reason is None:
            runnable.append(name)
        else:
            not_checked.append(f"{name}: unavailable ({reason})")
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    rows = []
    print(f"stfast {__version__} self-test on {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"torch {torch.__version__}", file=out)
    print(f"{'backend':<8}{'case':<48}{'ratio':>8}  result", file=out)
    for name in runnable:
        on_interpreter = name == "triton" and not cuda
        for case, make, fn in _cases(head_dims[:1] if on_interpreter else head_dims,
                                     [torch.float32] if on_interpreter else dtypes, device):
            torch.manual_seed(len(rows))
            start = time.time()
            try:
                ratio = _error_ratio(fn, make, name)
                result = "pass" if ratio <= 1.0 else "FAIL"
                error = None
            except ValueError as exc:  # the backend refuses this problem: auto falls back
                ratio, result, error = None, "refused", str(exc)
            except Exception as exc:  # a crash is a failure, reported, not raised
                ratio, result, error = None, "FAIL", f"{type(exc).__name__}: {exc}"
            rows.append(dict(backend=name, case=case, error_ratio=ratio, result=result, error=error,
                             seconds=round(time.time() - start, 3)))
            shown = "-" if ratio is None else f"{ratio:.3f}"
            print(f"{name:<8}{case:<48}{shown:>8}  {result}{': ' + error if error else ''}", file=out)
    if not cuda and "triton" in runnable:
        not_checked.append("triton under the interpreter: bfloat16/float16 and head dims other than "
                           f"{head_dims[0]} (only a GPU compiles them)")
    for line in not_checked:
        print(f"not checked: {line}", file=out)
    failed = sum(r["result"] == "FAIL" for r in rows)
    print(f"{len(rows)} cases, {failed} failed", file=out)
    result = dict(stfast=__version__, torch=torch.__version__, python=platform.python_version(),
                  device=torch.cuda.get_device_name() if cuda else "cpu",
                  stfast_backend=os.environ.get("STFAST_BACKEND"), backends=status, rows=rows,
                  not_checked=not_checked, failed=failed)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {json_path}", file=out)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stfast", description=__doc__)
    parser.add_argument("--selftest", action="store_true", help="check every available backend here")
    parser.add_argument("--interpret", action="store_true",
                        help="with --selftest on a machine without a GPU, also run the Triton kernels "
                             "under TRITON_INTERPRET=1")
    parser.add_argument("--json", default="stfast-selftest.json", help="where --selftest writes its results")
    args = parser.parse_args(argv)
    if not args.selftest:
        print(report())
        return 0
    return 1 if selftest(interpret=args.interpret, json_path=args.json)["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
