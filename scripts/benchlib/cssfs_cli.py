"""cssfs_cli: how the bench invokes the cssfs command line -- the one place that knows its argv.

What it knows: the subcommands and options of ``python -m cssfs`` (docs/CLI.md), a private
XDG_CONFIG_HOME with a fresh unprotected identity for the run. What it must not know: timing,
stores, what a suite measures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchlib.runner import BenchError


class CssfsCli:
    """``python -m cssfs`` with its own config home and identity (no passphrase)."""

    def __init__(self, repo: Path, home: Path) -> None:
        self.repo = repo
        self.home = home
        (home / "config").mkdir(parents=True, exist_ok=True)
        self.identity = home / "identity"
        self.base_env = dict(os.environ)
        self.base_env.update({
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "XDG_RUNTIME_DIR": str(home / "run"),
            "CSSFS_IDENTITY": str(self.identity),
            "PYTHONPATH": str(repo),
        })
        (home / "run").mkdir(mode=0o700, exist_ok=True)
        for k in ("CSSFS_PASSPHRASE_FILE", "CREDENTIALS_DIRECTORY", "CSSFS_STRICT"):
            self.base_env.pop(k, None)
        r = subprocess.run(self.argv("keygen", "--no-passphrase", "-o", str(self.identity)),
                           env=self.base_env, capture_output=True, stdin=subprocess.DEVNULL,
                           cwd=repo)
        if r.returncode != 0 or not self.identity.exists():
            raise BenchError(f"cssfs keygen failed: {r.stderr.decode(errors='replace')[-300:]}")
        self.recipient = r.stdout.decode().strip().splitlines()[0] if r.stdout else ""

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cssfs", *args]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(self.base_env)
        if extra:
            env.update(extra)
        return env

    def whoami(self) -> str:
        """This identity's cssfs1... recipient string."""
        r = subprocess.run(self.argv("whoami"), env=self.base_env, capture_output=True,
                           stdin=subprocess.DEVNULL, cwd=self.repo, check=True)
        for line in r.stdout.decode().splitlines():
            if line.startswith("cssfs1"):
                return line.strip()
        raise BenchError("cssfs whoami printed no recipient string")

    def has_command(self, name: str) -> bool:
        r = subprocess.run(self.argv(name, "--help"), env=self.base_env, capture_output=True,
                           stdin=subprocess.DEVNULL, cwd=self.repo)
        return r.returncode == 0

    # -- argv of each command --------------------------------------------------------------

    def encrypt(self, src: Path, dst: Path, recipients: list[str] | None = None) -> list[str]:
        extra: list[str] = []
        for r in recipients or []:
            extra += ["-r", r]
        return self.argv("encrypt", *extra, str(src), str(dst))

    def decrypt(self, src: Path, dst: Path) -> list[str]:
        return self.argv("decrypt", str(src), str(dst))

    def put(self, src: Path, bucket: str, key: str) -> list[str]:
        return self.argv("put", str(src), f"s3://{bucket}/{key}")

    def get(self, bucket: str, key: str, dst: Path) -> list[str]:
        return self.argv("get", f"s3://{bucket}/{key}", str(dst))
