import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT


@pytest.fixture
def tiny_config():
    return preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture
def byte_tokenizer():
    from lilliput.core.tokenizer import ByteTokenizer

    return ByteTokenizer()


@pytest.fixture
def one_thread():
    """Tiny models: a second OpenMP thread only adds contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (float32, CPU), loaded once per session."""
    from lilliput.core.checkpoint import load_model

    return load_model(None, device="cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
