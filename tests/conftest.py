import gc
import logging
import os
import sys

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from transformers.utils import logging as hf_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One thread per process, here and in every process a test starts (they inherit it; torchrun already sets it for 2
# processes): the tiny models' matrices are too small to share out, and OpenMP threads waiting for each other on a busy
# 2-core machine made the in-process tests 3-4x slower
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, os.path.dirname(__file__))

from tiny import QUANTIZABLE_WIDTHS, make_model, make_tokenizer  # noqa: E402

from minorsft_trl.reference.precompute import ReferencePrecompute  # noqa: E402

# The half million objects the imports above made, out of the collector's sight: `Trainer.train` (accelerate's
# `free_memory`) runs a full `gc.collect()`, which walked them all, 0.25 s per trained test
gc.freeze()


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
    original = ReferencePrecompute.compute_ref_logps

    def counting(self, dataset, name, batch_size):
        calls.append(name)
        return original(self, dataset, name, batch_size)

    monkeypatch.setattr(ReferencePrecompute, "compute_ref_logps", counting)
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


@pytest.fixture(params=["this CPU", "CPU without AVX512-BF16"])
def bnb_cpu_path(request, monkeypatch):
    """The 4-bit CPU path bitsandbytes takes: this machine's own, and the one of a CPU without AVX512-BF16 (where
    bitsandbytes never repacks weights). On a CPU without AVX512-BF16 both are the same path."""
    if request.param != "this CPU":
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    return request.param


@pytest.fixture(scope="session", params=["llama", "qwen2"], ids=["llama, unbiased", "qwen2, biased q/k/v"])
def quantizable_model_dir(request, tmp_path_factory, tokenizer):
    """A tiny random model with layer widths that bitsandbytes' 4-bit CPU paths accept, saved to disk."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}-quantizable")
    make_model(tokenizer, architecture=request.param, **QUANTIZABLE_WIDTHS).save_pretrained(path)
    return str(path)


def pytest_collection_modifyitems(items):
    """The tests that launch processes first (a stable sort: each file keeps its order): under `make test`'s two
    workers their launches then run beside the many short tests instead of alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
