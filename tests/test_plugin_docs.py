"""docs/plugins.md's worked example, file by file as the guide writes it: its tests pass and it resolves."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from rfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"


def write_example(into: Path) -> list[str]:
    """Write every fenced block of the guide whose first line is ``# rfkit-power/<path>``."""
    written = []
    for body in re.findall(r"```\w+\n(.*?)```", GUIDE.read_text(), re.S):
        name = re.match(r"# (rfkit-power/\S+)\n", body)
        if name:
            (into / name[1]).parent.mkdir(parents=True, exist_ok=True)
            (into / name[1]).write_text(body)
            written.append(name[1])
    return written


@pytest.fixture
def example(tmp_path, monkeypatch):
    files = write_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "rfkit-power"))
    yield tmp_path / "rfkit-power", files
    for name in [m for m in sys.modules if m.startswith(("rfkit_power", "test_power"))]:
        del sys.modules[name]
    gc.collect()  # let the example's classes go, so later tests do not see them as known subclasses


def test_worked_example_is_complete_and_its_tests_pass(example):
    folder, files = example
    assert sorted(files) == [
        "rfkit-power/pyproject.toml",
        "rfkit-power/rfkit_power/__init__.py",
        "rfkit-power/rfkit_power/samplers.py",
        "rfkit-power/tests/test_power.py",
    ]
    # the entry point names the package, whose import makes Power known
    pyproject = (folder / "pyproject.toml").read_text()
    assert re.search(r'\[project\.entry-points\."rfkit\.plugins"\]\npower = "rfkit_power"', pyproject)
    assert "torch" not in pyproject
    tests = _load(folder / "tests" / "test_power.py")
    tests.test_contract()
    tests.test_mean()


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("test_power", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_power"] = module
    spec.loader.exec_module(module)
    return module


def test_worked_example_resolves_by_short_name(example, capsys):
    importlib.import_module("rfkit_power")  # what the entry point does in `rfkit`
    with pytest.raises(SystemExit):
        main(["fit", f"--config={ROOT / 'configs/toy2d.yaml'}", "--model.timesteps=Power", "--print_config"])
    timesteps = yaml.safe_load(capsys.readouterr().out)["model"]["timesteps"]
    assert timesteps == {"class_path": "rfkit_power.Power", "init_args": {"k": 2.0}}
