import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from core.models import embedded_tokenizer

    return embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny():
    from core.models import load_model

    return load_model("tiny-random-llama")
