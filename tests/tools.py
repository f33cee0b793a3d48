"""Commands the tests need, and what CI expects of them: a missing tool skips a test on a
developer's machine and fails it under CI (tests/conftest.py also fails a CI run on any skip
outside its ALLOWED_SKIPS)."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need(tool: str, install: str) -> str:
    """The path of command ``tool``; without it the test skips, or under CI fails, naming ``install``."""
    path = shutil.which(tool)
    if path is None:
        if in_ci():
            pytest.fail(f"{tool} not found, and CI is set: {install}")
        pytest.skip(f"{tool} not installed ({install})")
    return path
