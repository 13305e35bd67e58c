"""The systemd user unit and `cssfs service install`: what systemd will read is valid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cssfs import cli, cmd_service

REPO = Path(__file__).resolve().parent.parent

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _verify(unit_dir: Path, instance: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    return subprocess.run(
        ["systemd-analyze", "verify", "--user", str(unit_dir / f"cssfs@{instance}.service")],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


def _link_instance(unit_dir: Path, instance: str) -> None:
    # systemd-analyze verifies a file by path; an instance name needs a file named after it.
    (unit_dir / f"cssfs@{instance}.service").symlink_to(unit_dir / "cssfs@.service")


def test_packaged_template_is_the_repository_unit() -> None:
    assert cmd_service.template_text() == (REPO / "systemd" / "cssfs@.service").read_text()


def test_template_is_type_notify_with_credential_free_execstart() -> None:
    text = cmd_service.template_text()
    assert "Type=notify" in text
    assert "Restart=on-failure" in text
    assert "TimeoutStopSec=" in text
    assert "passphrase" not in text.split("ExecStart=", 1)[1].splitlines()[0]


@needs_analyze
def test_repository_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    shutil.copy(REPO / "systemd" / "cssfs@.service", unit_dir / "cssfs@.service")
    _link_instance(unit_dir, "demo")
    result = _verify(unit_dir, "demo", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_analyze
def test_install_writes_a_valid_unit_env_and_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["keygen", "--no-passphrase"]) == 0
    secret = tmp_path / "passphrase"
    secret.write_text("not used here\n")
    unit_dir = tmp_path / "units"
    capsys.readouterr()

    code = cli.main([
        "--passphrase-file", str(secret), "service", "install", "--unit-dir", str(unit_dir),
        "home", "s3://bucket/prefix", str(tmp_path / "secure"), "--", "--cache-size", "64M",
    ])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    assert "systemctl --user enable --now cssfs@home" in out

    unit = (unit_dir / "cssfs@.service").read_text()
    assert f"ExecStart={sys.executable} -m cssfs mount --foreground" in unit
    env = (tmp_path / "config" / "cssfs" / "mounts" / "home.env").read_text()
    assert 'CSSFS_STORE="s3://bucket/prefix"' in env
    assert 'CSSFS_MOUNT_OPTIONS="--cache-size 64M"' in env
    assert "not used here" not in env + unit
    dropin = (unit_dir / "cssfs@home.service.d" / "credential.conf").read_text()
    assert f"LoadCredential=cssfs-passphrase:{secret}" in dropin

    _link_instance(unit_dir, "home")
    # The EnvironmentFile path (%E) is resolved at run time, not by verify; the unit must parse.
    result = _verify(unit_dir, "home", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr

    # A second install refuses to clobber the instance config; remove deletes it and the drop-in.
    assert cli.main(["service", "install", "--unit-dir", str(unit_dir), "home", "b",
                     str(tmp_path / "m")]) == cli.ExitCode.CONFIG
    assert "exists" in capsys.readouterr().err
    assert cli.main(["service", "remove", "--unit-dir", str(unit_dir), "home"]) == 0
    assert not (tmp_path / "config" / "cssfs" / "mounts" / "home.env").exists()
    assert not (unit_dir / "cssfs@home.service.d").exists()


def test_env_values_with_shell_metacharacters_are_refused() -> None:
    with pytest.raises(cmd_service.ConfigError):
        cmd_service.render_env('b"ad', Path("/m"), Path("/i"), [])


def test_install_options_after_the_mountpoint_are_installs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`install NAME STORE MNT --passphrase-file F --force --cache-size 1G -- -o allow_other`:
    F becomes the credential drop-in (not a mount option), --force replaces, the rest mounts."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["keygen", "--no-passphrase"]) == 0
    secret = tmp_path / "passphrase"
    secret.write_text("x\n")
    units = tmp_path / "units"
    base = ["service", "install", "home", "b", str(tmp_path / "m"), "--unit-dir", str(units)]
    assert cli.main(base) == 0
    assert cli.main([*base, "--passphrase-file", str(secret), "--force", "--cache-size", "1G",
                     "--", "-o", "allow_other"]) == 0
    capsys.readouterr()
    env = (tmp_path / "config" / "cssfs" / "mounts" / "home.env").read_text()
    assert 'CSSFS_MOUNT_OPTIONS="--cache-size 1G -o allow_other"' in env
    dropin = (units / "cssfs@home.service.d" / "credential.conf").read_text()
    assert f"LoadCredential=cssfs-passphrase:{secret}" in dropin
    assert cli.main([*base, "--force", "--unit-dir"]) == cli.ExitCode.CONFIG
    assert "expected one argument" in capsys.readouterr().err
