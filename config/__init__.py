"""Settings and the payer rule library (``config/payers/*.yaml``)."""

from pathlib import Path

PAYERS_DIR = Path(__file__).resolve().parent / "payers"
