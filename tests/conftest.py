"""Fixtures shared by every test file. Tiny models of each architecture live in tests/tiny.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import TINY_ARCHS, save_tiny, tiny_model


@pytest.fixture(params=TINY_ARCHS)
def tiny(request):
    """``(model, tokenizer)``: a tiny random model, once per supported architecture."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a HF directory, for ``--model PATH`` in CLI tests (read-only: copy before changing)."""
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))
