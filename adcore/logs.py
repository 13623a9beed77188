"""Quieter third-party loggers, set in one explicit call instead of at import time.

Importing or calling adcore changes no logger it does not own. A job that wants the
exporters' chatter and pydicom's value echoes kept out of its log calls
:func:`quiet_third_party_loggers` once, from its logging setup.
"""

from __future__ import annotations

import logging

# Levels for third-party loggers that flood a job's log with lines nobody reads.
THIRD_PARTY_LEVELS = {
    "onnxscript": logging.WARNING,  # the rewriter logs every rule it applies at INFO: hundreds of lines per export
    "torch.onnx._internal.exporter._registration": logging.ERROR,  # one warning per torchvision op (adcore has none)
    "onnx_ir": logging.WARNING,  # INFO per graph pass
    "faiss.loader": logging.WARNING,  # ten INFO lines per process on which CPU instruction set it tried
}
# pydicom's logger, whose records may quote element values (patient identifiers).
PYDICOM_LOGGER = "pydicom"


class DropValueEchoes(logging.Filter):
    """Drops pydicom log records that echo element values (they may be identifiers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Invalid value" not in str(record.msg)


def quiet_third_party_loggers() -> None:
    """Set the levels in :data:`THIRD_PARTY_LEVELS` and filter pydicom's value echoes.

    Idempotent: calling it again sets the same levels and adds no second filter.
    """
    for name, level in THIRD_PARTY_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    pydicom = logging.getLogger(PYDICOM_LOGGER)
    if not any(isinstance(f, DropValueEchoes) for f in pydicom.filters):
        pydicom.addFilter(DropValueEchoes())
