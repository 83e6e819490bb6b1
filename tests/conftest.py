"""Shared fixtures: tiny random models for most tests, the embedded model loaded once per session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama():
    import hiddenlens as hl
    return hl.load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    import hiddenlens as hl
    return hl.load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (fp32, default SDPA attention), loaded once for the whole session."""
    import hiddenlens as hl
    return hl.load_model("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def smollm_eager(smollm):
    """The embedded model with eager attention (for parity against HF's output_attentions), over the same weight
    tensors as ``smollm``: the weights are loaded once per session."""
    return smollm.with_attention("eager")
