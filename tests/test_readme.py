"""README's quick start as a newcomer runs it: every command it prints, then its Python example, as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from sam_cls.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text()
    return text[text.index("## Quick start"): text.index("## Commands")]


def test_the_quick_start_runs_as_printed(tmp_path, monkeypatch):
    """The README's run is trained for one epoch here (its full ten take ~40 s) under the directory name it
    prints; each `$ sam-cls` line then runs as printed, and the Python block after them runs as written."""
    monkeypatch.chdir(tmp_path)
    section = quick_start()
    assert "\nsam-cls train\n" in section
    run = CliRunner().invoke(main, ["train", "--epochs", "1", "--out", "runs/mnist-mini-conv1-k256"])
    assert run.exit_code == 0, run.output
    commands = [line[2:].split("  #")[0] for line in section.splitlines() if line.startswith("$ sam-cls ")]
    assert commands[0] == "sam-cls examples" and len(commands) >= 7  # the images the others name come first
    for command in commands:
        result = CliRunner().invoke(main, shlex.split(command)[1:])
        assert result.exit_code == 0, f"{command}: {result.output}"
    assert Path("grid.png").is_file()
    python = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(python) == 1
    Path("example.py").write_text(python[0])  # the example as a newcomer pastes it, in a Python of its own
    result = subprocess.run([sys.executable, "example.py"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
