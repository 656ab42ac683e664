"""``python -m stfast --selftest``: a table and a JSON file users can attach to a bug report."""

import io
import json
import os
import subprocess
import sys

import torch

import stfast.__main__ as main
from stfast import backends


def test_selftest_runs_on_cpu_and_says_what_it_could_not_check(tmp_path):
    path = tmp_path / "selftest.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STFAST_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "stfast", "--selftest", "--json", str(path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert rows and all(r["result"] == "pass" for r in rows)
    cases = " ".join(r["case"] for r in rows)
    for what in ("D=64", "D=72", "D=128", "top_left", "bottom_right", "axis=time", "axis=space", "mask",
                 "block-sparse", "bfloat16", "float16", "float32"):
        assert what in cases, what
    if not torch.cuda.is_available():
        assert {r["backend"] for r in rows} == {"torch"}
        assert any(line.startswith("triton:") and "--interpret" in line for line in result["not_checked"])
        assert any(line.startswith("cuda:") for line in result["not_checked"])
    assert "not checked: triton" in proc.stdout or torch.cuda.is_available()
    assert f"{len(rows)} cases, 0 failed" in proc.stdout


def test_selftest_catches_a_wrong_backend(monkeypatch):
    """A backend off by 0.1 (exact in float64, the reference) fails every case."""
    torch_backend = backends.get("torch")
    run = torch_backend.run

    def wrong(problem, need_lse):
        out, lse = run(problem, need_lse)
        return (out if problem.dtype == torch.float64 else out + 0.1), lse

    monkeypatch.setattr(torch_backend, "run", wrong)
    text = io.StringIO()
    result = main.selftest(json_path=None, head_dims=(8,), out=text)
    assert result["failed"] == len(result["rows"]) > 0, text.getvalue()
    assert "FAIL" in text.getvalue()
