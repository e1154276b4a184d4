import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from relicv2_cli.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    """The tests run tiny networks, whose cost is mostly OpenMP thread hand-off: on a 2-core machine
    one thread runs them several times faster (measured 5-10x when the other core is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_pretrain(tmp_path_factory):
    """tests/test_learning.py's seed-0 synthetic RELICv2 run (184 steps, 20-40 s), shared with
    tests/test_semi.py so that the suite trains it once."""
    from test_learning import SYNTHETIC, SYNTHETIC_TRAIN, short_pretrain

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # convolution-bound
    try:
        return short_pretrain("synthetic", SYNTHETIC, 0, tmp_path_factory.mktemp("synthetic-pretrain"),
                              **SYNTHETIC_TRAIN)
    finally:
        torch.set_num_threads(before)


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        return self.out.strip().splitlines()[-1]


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `relicv2 ARGS...` in-process through the real entry point (error handling included)."""

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["relicv2", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def cifar_dir() -> Path:
    root = os.environ.get("RELICV2_DATA")
    if not root:
        pytest.skip("RELICV2_DATA is not set (CI sets it to ../shared/data)")
    if not (Path(root) / "cifar-10-batches-py").is_dir():
        pytest.skip(f"no cifar-10-batches-py under RELICV2_DATA={root}")
    return Path(root)


FASHION_MNIST = Path(os.environ.get("RELICV2_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture
def fashion_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST
