"""bdseal's user-facing error base class.

Every error that means "the user asked for something that cannot work" (a bad option, a missing or
corrupt file, a data set too small) derives from :class:`BdsealError`. The command line prints such an
error as one line ``bdseal: error: <message>`` and exits with status 2 (``BDSEAL_DEBUG=1`` shows the
traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BdsealError(Exception):
    """A user error: the message says what is wrong, which key or file, and what to do."""


class ConfigError(BdsealError, ValueError):
    """A configuration value that cannot work (names the key, the value and the valid choices)."""


class TrainingDivergedError(BdsealError, FloatingPointError):
    """A loss, flow, Sinkhorn plan or EM step became non-finite; no result is written."""
