"""The README's examples run as printed and print what they promise."""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_swap_example_prints_shape_time_and_backend():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_readme_block("## Swap it into a model"), "README.md", "exec"), {})
    printed = out.getvalue()
    assert re.search(r"output \(2, 8, 196, 384\) in [0-9.]+ ms on (cpu|cuda), backend: ", printed), printed


@pytest.mark.distributed
def test_sequence_parallel_example_under_torchrun():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "sequence_parallel.py"), "--shape", "1,5,16,32", "--heads", "4",
           "--steps", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 1: loss per rank" in done.stdout
    # 5 frames over 2 ranks: 3 and 2, gathered back to all 5
    assert "2 processes (gloo, cpu), mesh dp=1 x sp=2" in done.stdout
    assert "this rank's frames (1, 3, 16, 32), gathered output (1, 5, 16, 32)" in done.stdout
