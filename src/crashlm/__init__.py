"""crashlm: fine-tune LLMs without the full model (CRaSh emulators on Offsite-Tuning)."""

__version__ = "0.1.0"
