import pytest
import torch

from lmadapt.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model():
    return tiny_llama()
