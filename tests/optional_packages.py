"""Tests of optional packages (installed by the dev extra): skipped where one is missing, except in CI."""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_package(module: str, extra: str) -> None:
    """Skip the calling test when ``module`` is not installed, or fail under ``BMOJO_REQUIRE_REFERENCES=1`` (CI,
    whose dev extra installs it)."""
    if importlib.util.find_spec(module) is not None:
        return
    reason = f"{module} is not installed (pip install -e '.[{extra}]')"
    if os.environ.get("BMOJO_REQUIRE_REFERENCES") == "1":
        pytest.fail(f"{reason}, and BMOJO_REQUIRE_REFERENCES=1 requires it")
    pytest.skip(reason)
