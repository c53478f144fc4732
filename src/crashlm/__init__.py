"""crashlm: fine-tune LLMs without the full model (CRaSh emulators on Offsite-Tuning)."""

__version__ = "0.1.0"


def load_emulator(path, *args, **kwargs):
    """Rebuild an emulator from its bundle directory (see :func:`crashlm.emulators.bundle.load_emulator`).

    Imported lazily so ``import crashlm`` stays cheap."""
    from crashlm.emulators.bundle import load_emulator as _load

    return _load(path, *args, **kwargs)
