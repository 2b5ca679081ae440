import os
import tempfile

# Tests never touch the network or the user's caches.
_TMP = tempfile.mkdtemp(prefix="fastgen-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ["HF_HOME"] = os.path.join(_TMP, "hf")
os.environ["TORCH_HOME"] = os.path.join(_TMP, "torch")
os.environ["FASTGEN_CACHE"] = os.path.join(_TMP, "fastgen-cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest single-threaded (with 2 OpenMP threads on a busy machine a forward
    can stall at every thread barrier). Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
