"""Shared fixtures: tiny real models saved to disk (random weights, locally trained tokenizer), offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path, monkeypatch):
    """Each test gets its own data root (and so its own cache and SQLite file)."""
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_DATA_ROOT", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tokenizer():
    from advisor.demo import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """{'llama': path, 'gpt2': path, 't5': path} — tiny models with weights and tokenizer on disk."""
    from advisor.demo import write_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(root / arch, arch, tokenizer) for arch in ("llama", "gpt2", "t5")}
