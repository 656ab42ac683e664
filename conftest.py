"""pytest configuration shared by ``tests/`` and ``bench/``: without a GPU the Triton
kernels run on the CPU through the interpreter, and tests marked ``gpu`` skip."""

import os

import pytest

# Triton reads TRITON_INTERPRET when it is imported: decide here, in the root conftest,
# before any test module of either folder imports it.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def allow_tf32():
    """Set ``torch.backends.cuda.matmul.allow_tf32`` for one test and restore it after.
    (pytest's monkeypatch cannot: on pytest >= 9.2 it looks the flag up statically, finds
    no attribute on ``cuBLASModule``, and deletes it at teardown.)"""
    import torch

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32

    def set_to(value: bool) -> None:
        matmul.allow_tf32 = value

    yield set_to
    matmul.allow_tf32 = before
