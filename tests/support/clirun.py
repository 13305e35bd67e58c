"""Running ``cssfs`` in-process for the CLI tests: a private HOME, and argv -> (code, out, err)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cssfs import cli

# Variables that would let the developer's own identity, credentials or journald leak in.
_CLEARED = ("XDG_CACHE_HOME", "XDG_RUNTIME_DIR", "CSSFS_IDENTITY", "CSSFS_PASSPHRASE_FILE",
            "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM")


@dataclass
class Result:
    code: int
    out: str
    err: str


Run = Callable[..., Result]


def private_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private HOME / XDG tree; the working directory becomes ``tmp_path / "work"``."""
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".state"))
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(work)
    return work


def runner(capsys: pytest.CaptureFixture[str]) -> Run:
    """``run(*argv)``: cli.main in-process, with what it printed."""

    def run(*argv: str) -> Result:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return Result(int(code), captured.out, captured.err)

    return run


def ok(result: Result) -> Result:
    """The command succeeded and printed nothing on stderr."""
    assert (result.code, result.err) == (0, ""), result
    return result


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private HOME (private_home) for the test; the working directory is inside it."""
    yield private_home(monkeypatch, tmp_path)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """``run(*argv)``: cssfs in-process (runner)."""
    return runner(capsys)
