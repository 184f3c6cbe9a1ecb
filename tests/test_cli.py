from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qlora_pipeline", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["run", "--help"],
        ["quick-test", "--help"],
        ["reproduce", "--help"],
        ["compare", "--help"],
        ["config", "show", "--help"],
    ],
)
def test_help_does_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys\nfrom qlora_pipeline.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unknown_flag_is_refused_with_exit_2() -> None:
    result = run_cli("run", "--config", "quick_test", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_config_show_prints_resolved_config_with_overrides() -> None:
    result = run_cli("config", "show", "quick_test", "--set", "training.learning_rate=1e-4", "--format", "json")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["training"]["learning_rate"] == 1e-4
    assert resolved["experiment"]["name"] == "quick-test"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("experiment:\n  name: [unclosed\n", "invalid YAML at line 3, column 1"),
        ("experiment:\n  nmae: x\n", "did you mean 'name'"),
        ("training:\n  learning_rate: -1\n", "training.learning_rate must be > 0, got -1"),
        ("experiment:\n  seed: abc\n", "experiment.seed"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_no_run_dir(tmp_path: Path, content: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    out = tmp_path / "outputs"
    result = run_cli("run", "--config", str(config), "--output-dir", str(out))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_missing_config_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_unwritable_output_root_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["quick-test", "--output-dir", str(blocker / "outputs")]) == 2
    assert "cannot create output root" in capsys.readouterr().err


def test_readme_commands_are_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = [block.split("```")[0].strip() for block in readme.split("```bash")[1:3]]
    assert len(commands) == 2
    for command in commands:
        assert command in ci, f"README command not run by .ci/run: {command}"
