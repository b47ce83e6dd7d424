"""Shared fixtures: W&B stays offline and quiet in every test, and in-process runs are finished."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.getbasetemp()))
    yield
    import sys

    if "wandb" in sys.modules:  # a run left open would be reused by the next WandbLogger
        sys.modules["wandb"].finish()
