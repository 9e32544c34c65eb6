import os

# One thread per process: the suite's models are tiny, and on a machine whose cores are busy
# a thread pool that waits for its other threads slows each step many times over. Set before
# anything starts a pool; subprocesses (the CLI, notebook kernels) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
