"""pytest configuration shared by ``tests/`` and ``bench/``: tests marked ``gpu`` skip
without a CUDA device."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
