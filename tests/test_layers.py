"""The layering is a contract: core <- controller, worker, clients <- bench <- cli.

The contract lives in pyproject.toml (`[tool.importlinter]`); `lint-imports` (import-linter) checks
every import in the installed package against it, including imports inside functions.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(config: Path = ROOT / "pyproject.toml") -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency (pip install -e '.[dev]')"
    return subprocess.run([exe, "--config", str(config), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_every_import_respects_the_layers():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "KEPT" in result.stdout


def test_the_contract_can_fail(tmp_path):
    """The same check with the layers upside down reports the controller's imports of the core:
    it reads real imports, it is not vacuous."""
    config = (ROOT / "pyproject.toml").read_text()
    layers = config[config.index("layers = ["):]
    layers = layers[:layers.index("]") + 1]
    inverted = 'layers = [\n    "smartspec.core",\n    "smartspec.controller",\n]'
    (tmp_path / "pyproject.toml").write_text(config.replace(layers, inverted))
    result = _lint_imports(tmp_path / "pyproject.toml")
    assert result.returncode != 0
    assert "smartspec.controller is not allowed to import smartspec.core" in result.stdout
    assert "smartspec.controller.planner -> smartspec.core.acceptance" in result.stdout
