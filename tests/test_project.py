"""Project files users launch: the CLI and job entrypoints answer (cluster files: tests/test_deploy.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tokens_module_prints_the_layout():
    out = subprocess.run([sys.executable, "-m", "musicray.tokens"], capture_output=True, text=True, check=True).stdout
    assert "musicray vocabulary:" in out and "<Sec_i1>" in out and "<Tempo_240>" in out


def test_cli_synth_then_inspect(tmp_path):
    from musicray.cli import main

    assert main(["data", "synth", "--songs", "12", "--out", str(tmp_path / "d"), "--num-cpus", "2"]) == 0
    assert main(["data", "inspect", str(tmp_path / "d")]) == 0


def test_cli_reports_a_bad_pop909_folder(tmp_path, capsys):
    from musicray.cli import main

    assert main(["data", "prepare", "--pop909", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--pop909" in capsys.readouterr().err


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = [line for line in text.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert "musicray pipeline" in commands[0] and "pytest" in commands[1]
    assert text.index(commands[0]) < text.index("## ")
