"""Fixtures for the tests; the helpers they are built from live in testing_utils.py.

Nothing is downloaded unless a test is marked `downloads`: the Hub is unreachable on the machines that run these tests.
"""

import os

import pytest
import torch
from datasets import Dataset
from testing_utils import PAIRS, build_model, build_tokenizer
from transformers import PreTrainedTokenizerFast


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer) -> str:
    """A tiny Llama and the tokenizer saved together, as a model path a script would receive."""
    path = tmp_path / "tiny-llama"
    build_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def pair_dataset() -> Dataset:
    return Dataset.from_list([{"parallel_source": s, "parallel_target": t} for s, t in PAIRS])
