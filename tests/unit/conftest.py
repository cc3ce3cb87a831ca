"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state dir per test (so a fresh audit anchor key); no sinks or key from the env."""
    state = tmp_path / "state"
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(state))
    monkeypatch.delenv("GLASSROOM_AUDIT_ANCHOR_KEY", raising=False)
    monkeypatch.delenv("GLASSROOM_AUDIT_SINKS", raising=False)
    return state
