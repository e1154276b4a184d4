"""Console output: plain progress lines off a terminal, the Rich bar in one, and --help rendering."""

import importlib
import inspect
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from relicv2_cli import cli as cli_module
from relicv2_cli import options
from relicv2_cli.errors import RelicError


def test_plain_line_rate_and_eta_by_hand(monkeypatch):
    monkeypatch.setenv("RELICV2_PROGRESS_EVERY", "10")
    printed = []
    monkeypatch.setattr(options.console, "print", lambda text, **_: printed.append(text))
    clock = [0.0]
    with options.progress_bar(False) as progress:
        assert isinstance(progress, options.PlainProgress)
        progress.get_time = lambda: clock[0]
        task = progress.add_task("pretrain run", total=100, info="", images_per_item=8)
        clock[0] = 5.0
        progress.update(task, completed=10)
        assert printed == []  # 5 s < 10 s since the start
        clock[0] = 10.0
        progress.update(task, info="loss 1.500")
        assert printed == []  # info alone is no progress
        progress.update(task, completed=20)
        # 10 steps in the 5 s between the two samples: 2 steps/s, 16 images/s; 80 steps left: 40 s.
        assert printed == ["pretrain run: 20/100 (20%) loss 1.500 | 2 it/s, 16 images/s | 0:00:10 elapsed, "
                           "ETA 0:00:40"]
        clock[0] = 12.0
        progress.update(task, completed=100)  # finishing prints at once
        assert printed[-1].startswith("pretrain run: 100/100 (100%) loss 1.500 |") and printed[-1].endswith(
            "0:00:12 elapsed, done")


def test_progress_lines_of_a_cli_run_off_a_terminal(tmp_path, cli, monkeypatch):
    args = ("eval", "features", "random:resnet18", "synthetic", "--limit-train", "64", "--batch-size", "16",
            "--width", "0.25", "--workdir", tmp_path, "--precision", "fp32")
    monkeypatch.setenv("RELICV2_PROGRESS_EVERY", "0")
    result = cli(*args)
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("features random:resnet18 train: ")]
    assert [re.search(r": (\d+)/64 ", line).group(1) for line in lines] == ["16", "32", "48", "64"]
    assert lines[-1].endswith(", done") and "images/s" in lines[-1]
    monkeypatch.setenv("RELICV2_PROGRESS_EVERY", "30")  # default interval: only the end of a short run
    result = cli(*args, "--force", "--name", "again")
    lines = [line for line in result.err.splitlines() if "features random:resnet18 train: " in line]
    assert lines[0].startswith("features random:resnet18 train: 64/64 (100%)")
    monkeypatch.setenv("RELICV2_PROGRESS_EVERY", "soon")
    bad = cli(*args, "--name", "third")
    assert bad.code == 2 and "RELICV2_PROGRESS_EVERY must be a number of seconds >= 0, got 'soon'" in bad.err


def test_pretrain_off_a_terminal_prints_a_line_per_step_with_the_loss(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("RELICV2_PROGRESS_EVERY", "0")
    result = cli("pretrain", "synthetic", "--limit-train", "32", "--limit-test", "16", "--width", "0.25",
                 "--batch-size", "16", "--epochs", "2", "--max-steps", "3", "--proj-hidden", "32",
                 "--proj-dim", "16", "--log-every", "1", "--workdir", tmp_path, "--precision", "fp32")
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines()
             if line.startswith("relicv2 relicv2-synthetic-resnet18: ")]
    steps = [re.search(r": (\d)/3 \(\d+%\) loss \d\.\d{3}", line).group(1) for line in lines]
    assert steps == ["1", "2", "3"]
    assert "ETA" in lines[1] and lines[-1].endswith(", done")
    assert re.search(r"\| [\d.e+-]+ steps/s, \d+ images/s \|", lines[-1]), lines[-1]  # 16 images a step


def test_rich_bar_in_a_terminal_and_nothing_when_quiet(monkeypatch):
    monkeypatch.setattr(options, "console", Console(file=io.StringIO(), force_terminal=True))
    with options.progress_bar(False) as progress:
        assert type(progress) is Progress and not progress.disable
    with options.progress_bar(True) as progress:
        assert type(progress) is Progress and progress.disable


@pytest.mark.parametrize("command", [(), ("pretrain",), ("rerun",), ("embed",), ("export",), ("data", "info"),
                                     ("artifacts", "show"), ("analyze", "neighbors"), ("eval", "linear"),
                                     ("report",)])
def test_help_has_no_brace_placeholders_or_bool_types(cli, command):
    result = cli(*command, "--help")
    assert result.code == 0
    assert "<bool>" not in result.out and "{" not in result.out
    usage = next(line for line in result.out.splitlines() if "Usage:" in line)
    expected = {("embed",): "ENCODER SPEC", ("analyze", "neighbors"): "ENCODER... SPEC",
                ("report",): "[WORKDIR]", ("data", "info"): "SPEC", ("artifacts", "show"): "ART",
                ("rerun",): "ART"}
    if command in expected:
        assert usage.rstrip().endswith(expected[command])


def test_bad_progress_interval_is_an_error(monkeypatch):
    monkeypatch.setenv("RELICV2_PROGRESS_EVERY", "-1")
    with pytest.raises(RelicError, match="got '-1'"):
        options.progress_every()


@pytest.mark.parametrize("args", [["--help"], ["eval", "--help"], ["analyze", "--help"]])
def test_help_lists_every_command_without_importing_torch(args):
    """The stage modules import torch (seconds); a group's --help lists its commands without them."""
    code = (f"import sys; sys.argv = ['relicv2', *{args!r}]; from relicv2_cli.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                              "COLUMNS": "200"})
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    table = {(): cli_module.STAGES, ("eval",): cli_module.EVAL_STAGES,
             ("analyze",): cli_module.ANALYZE_STAGES}[tuple(args[:-1])]
    for name, (_, _, help) in table.items():
        assert re.search(rf"│ {name} +{re.escape(help)}", out.stdout), (name, out.stdout)
    print(f"relicv2 {' '.join(args)}: {seconds:.2f} s")


@pytest.mark.parametrize("table", ["STAGES", "EVAL_STAGES", "ANALYZE_STAGES"])
def test_listed_help_is_each_commands_own(table):
    """The --help listing comes from cli.py's tables; each entry names the command's function and
    repeats the first paragraph of its docstring (what Typer would show)."""
    for module, attribute, help in getattr(cli_module, table).values():
        function = getattr(importlib.import_module(module), attribute)
        assert help == " ".join(inspect.getdoc(function).split("\n\n")[0].split())
