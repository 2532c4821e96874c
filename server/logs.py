"""How the server's processes log: one format, and the libraries' noise turned down."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    quiet_libraries()


def quiet_libraries() -> None:
    """transformers prints a load report for every adapter (base keys 'missing'); it is noise here."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
