"""What the console scripts share: turning known failures into one clear line and an exit code."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from omegaconf.errors import MissingMandatoryValue

from bmojo.data import DataError
from bmojo.train import CheckpointError, DeviceError, NonFiniteLossError

USER_ERRORS = (DataError, CheckpointError, DeviceError, NonFiniteLossError, MissingMandatoryValue, ValueError)


@contextlib.contextmanager
def user_errors(program: str) -> Iterator[None]:
    """Print a known failure as ``program: error: ...`` and exit 1 (a traceback with ``BMOJO_DEBUG=1``)."""
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get("BMOJO_DEBUG"):
            raise
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(1)
