"""pytest configuration for the benchmark cases: ``pytest bench/ --benchmark-only``.

The repository's ``testpaths`` is ``tests/``, so a plain ``pytest`` never collects
these; they run only when ``bench/`` is named.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
