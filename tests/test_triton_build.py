"""Every Triton configuration the launcher can select compiles for sm_80 and sm_90 on a
machine without a GPU, within shared memory and, on bf16/fp16 paths with head dims
<= 128, without register spills (``tests/triton_aot.py`` prints the table).

Compiles are cached in ``tests/triton_aot_cache.json`` keyed on each kernel's source
hash, the Triton version and the full specialisation, so an unchanged kernel is
checked in seconds; a changed one is recompiled (5-15 s per configuration)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


@pytest.mark.build
def test_every_selectable_triton_config_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(HERE / "triton_aot.py")], capture_output=True, text=True,
                          env=env, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    checked = re.search(r"(\d+) checked", proc.stdout)
    # 2 archs x 3 dtypes x 5 head-dim buckets, each with the tiled and packed kernels
    # with and without a mask.
    assert checked and int(checked.group(1)) >= 2 * 3 * 5 * 8, proc.stdout[-2000:]
    for arch in ("sm_80", "sm_90"):
        for kernel in ("fwd", "dq", "dkdv", "packed_fwd", "packed_bwd", "preprocess"):
            assert re.search(rf"^{arch}\s+{kernel}\s", proc.stdout, re.M), (arch, kernel)
