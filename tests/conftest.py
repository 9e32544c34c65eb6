import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda`` tests without a GPU, and ``slow`` ones unless ``OOC_MOE_SLOW=1``."""
    skips = {}
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if os.environ.get("OOC_MOE_SLOW") != "1":
        skips["slow"] = pytest.mark.skip(reason="slow: set OOC_MOE_SLOW=1 to run")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
