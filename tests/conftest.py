import logging
import os
import sys

import pytest
from transformers.utils import logging as hf_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, os.path.dirname(__file__))

from tiny import make_model, make_tokenizer  # noqa: E402

from minorsft_trl import MinorSFTTrainer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved to disk, so the paths that load a model from a path can be tested offline."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def count_reference_passes(monkeypatch):
    """Counts the precompute passes over a dataset (each one a sequence of reference forwards)."""
    calls = []
    original = MinorSFTTrainer._compute_ref_logps

    def counting(self, dataset, name, batch_size):
        calls.append(name)
        return original(self, dataset, name, batch_size)

    monkeypatch.setattr(MinorSFTTrainer, "_compute_ref_logps", counting)
    return calls


@pytest.fixture
def warnings_of_minorsft():
    """The messages that minorsft_trl logs at warning level or above."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = hf_logging.get_logger("minorsft_trl")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
