"""Shared fixtures: W&B stays offline and quiet in every test, and in-process runs are finished."""

from __future__ import annotations

import os

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


@pytest.fixture(autouse=True)
def _restore_environment():
    """Undo what a test's in-process Lightning run leaves in os.environ (LOCAL_RANK, MASTER_PORT, ...).

    Left behind, they reach the `rfkit fit` subprocesses of later tests: with LOCAL_RANK set, Lightning
    takes the processes to be launched by someone else, starts no second rank, and rank 0 waits for
    it until the rendezvous times out (30 minutes).
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
