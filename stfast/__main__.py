"""``python -m stfast``: versions, devices, and which backends work here and why not."""

import platform

import torch

from . import __version__, backends


def report() -> str:
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
    lines.append("backends:")
    for name, reason in backends.available().items():
        lines.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
        if name == "cuda":
            from . import cuda

            lines.append(f"          extension: {cuda.status()}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
