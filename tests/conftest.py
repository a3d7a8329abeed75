import os

# moshi compiles a few functions with torch.compile unless this is set (~18 s on CPU per process).
os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests never measure time. With pytest-timeout installed (the dev extras), a test that runs this long
# has hung: fail it instead of blocking CI forever. Generous on purpose (a loaded 2-core machine).
HANG_TIMEOUT_S = 3600


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("timeout"):
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(HANG_TIMEOUT_S))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
