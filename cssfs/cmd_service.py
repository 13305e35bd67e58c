"""cmd_service: ``cssfs service install|remove`` -- a mount as a systemd user service.

What it knows: the unit template ``systemd/cssfs@.service`` (shipped inside the package as
``cssfs/data/cssfs@.service``), where systemd looks for user units and drop-ins, and the
per-instance environment file ``$XDG_CONFIG_HOME/cssfs/mounts/NAME.env`` that the unit reads.
What it must not know: how a mount works. It never starts anything: it writes files and prints
the ``systemctl --user`` commands to run, so it works the same in a container without systemd.

The identity passphrase never goes on a command line or into the environment file: with
``--passphrase-file`` a drop-in adds ``LoadCredential=cssfs-passphrase:FILE``, which systemd
hands to the daemon as ``$CREDENTIALS_DIRECTORY/cssfs-passphrase`` (read by cssfs.config).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from cssfs import config
from cssfs.errors import ConfigError

if TYPE_CHECKING:
    from cssfs.cli import Subparsers

UNIT_NAME = "cssfs@.service"
INSTANCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# The template's ExecStart runs `cssfs` from PATH; the installed copy runs the cssfs that was
# used to install it (a venv is rarely on the user manager's PATH).
TEMPLATE_EXEC = "/usr/bin/env cssfs "


def register(commands: Subparsers) -> None:
    p = commands.add_parser(
        "service", help="run a mount as a systemd user service",
        description="Install or remove a systemd user service that keeps a store mounted "
        "(Type=notify: ready once the mount is usable; stopping finishes pending uploads).",
    )
    sub = p.add_subparsers(dest="service_command", metavar="ACTION", required=True)

    q = sub.add_parser(
        "install", help="write the unit and the instance's config",
        description="Write ~/.config/systemd/user/cssfs@.service and the instance config "
        "$XDG_CONFIG_HOME/cssfs/mounts/NAME.env, then print the systemctl commands to start it.",
    )
    q.add_argument("name", metavar="NAME", help="instance name: the unit is cssfs@NAME")
    q.add_argument("store", metavar="STORE", help="bucket, s3://bucket/prefix or file:///path")
    q.add_argument("mountpoint", metavar="MOUNTPOINT")
    q.add_argument("--force", action="store_true", help="replace an existing instance config")
    q.add_argument("--unit-dir", metavar="DIR",
                   help="where to write the unit (default: $XDG_CONFIG_HOME/systemd/user)")
    q.add_argument("mount_options", nargs=argparse.REMAINDER, metavar="-- MOUNT-OPTION",
                   help="options passed to `cssfs mount`, after `--` (e.g. -- --cache-size 1G); "
                   "--force, --unit-dir, -i and --passphrase-file stay install's own even "
                   "after MOUNTPOINT (before the `--`)")
    q.set_defaults(func=_install)

    q = sub.add_parser("remove", help="delete an instance's config (stop it first)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--unit-dir", metavar="DIR")
    q.set_defaults(func=_remove)


def template_text() -> str:
    """The unit template as shipped with this cssfs."""
    return resources.files("cssfs").joinpath("data", UNIT_NAME).read_text(encoding="utf-8")


def render_unit(template: str, python: str) -> str:
    """The template with ExecStart running ``python -m cssfs`` instead of ``cssfs`` from PATH."""
    if TEMPLATE_EXEC not in template:
        raise ConfigError(f"the unit template has no '{TEMPLATE_EXEC.strip()}' ExecStart")
    return template.replace(TEMPLATE_EXEC, f"{shlex.quote(python)} -m cssfs ")


def render_env(store: str, mountpoint: Path, identity: Path, options: list[str]) -> str:
    """The instance's EnvironmentFile: systemd's syntax, each value double-quoted."""

    def value(text: str) -> str:
        if any(c in text for c in '"\\\n$`'):
            raise ConfigError(f"unsupported character in service setting: {text!r}")
        return f'"{text}"'

    lines = [
        "# cssfs mount instance, read by cssfs@.service (EnvironmentFile=).",
        f"CSSFS_STORE={value(store)}",
        f"CSSFS_MOUNTPOINT={value(str(mountpoint))}",
        f"CSSFS_IDENTITY={value(str(identity))}",
        f"CSSFS_MOUNT_OPTIONS={value(' '.join(options))}",
    ]
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            lines.append(f"{name}={value(os.environ[name])}")
    return "\n".join(lines) + "\n"


def render_credential_dropin(passphrase_file: Path) -> str:
    return (
        "# Written by `cssfs service install --passphrase-file`.\n"
        "[Service]\n"
        f"LoadCredential={config.CREDENTIAL_NAME}:{passphrase_file}\n"
    )


def _unit_dir(args: argparse.Namespace) -> Path:
    if args.unit_dir:
        return Path(args.unit_dir)
    return config.config_dir().parent / "systemd" / "user"


def _env_path(name: str) -> Path:
    if not INSTANCE_NAME.fullmatch(name):
        raise ConfigError(f"bad service name {name!r}: use letters, digits, '.', '_', '-'")
    return config.config_dir() / "mounts" / f"{name}.env"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    tmp.replace(path)


def _own_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--force", action="store_true")
    p.add_argument("--unit-dir")
    p.add_argument("-i", "--identity")
    p.add_argument("--passphrase-file")
    return p


def split_mount_options(args: argparse.Namespace) -> list[str]:
    """The mount options among the words after MOUNTPOINT (argparse hands all of them over).

    Before a ``--``, install's own options (``--force``, ``--unit-dir``, ``-i``,
    ``--passphrase-file``) are taken back and set on ``args`` -- so ``install NAME STORE MNT
    --passphrase-file F`` writes the credential drop-in instead of passing F to the mount --
    and anything else goes to the mount; after a ``--`` everything goes to the mount.
    """
    words = list(args.mount_options)
    cut = words.index("--") if "--" in words else len(words)
    try:
        own, rest = _own_options().parse_known_args(words[:cut])
    except argparse.ArgumentError as exc:
        raise ConfigError(f"service install: {exc}") from None
    args.force = args.force or own.force
    for name in ("unit_dir", "identity", "passphrase_file"):
        if getattr(own, name) is not None:
            setattr(args, name, getattr(own, name))
    return [*rest, *words[cut + 1 :]]


def _install(args: argparse.Namespace) -> int:
    options = split_mount_options(args)
    env_path = _env_path(args.name)
    if env_path.exists() and not args.force:
        raise ConfigError(f"{env_path} exists (use --force to replace it)")
    identity = config.identity_path(args.identity).resolve()
    if not identity.exists():
        raise ConfigError(f"no identity at {identity} (run `cssfs keygen` first)")
    mountpoint = Path(args.mountpoint).expanduser().resolve()

    unit_dir = _unit_dir(args)
    _write(unit_dir / UNIT_NAME, render_unit(template_text(), sys.executable))
    _write(env_path, render_env(args.store, mountpoint, identity, options), 0o600)
    dropin = unit_dir / f"cssfs@{args.name}.service.d" / "credential.conf"
    if args.passphrase_file:
        secret = Path(args.passphrase_file).expanduser().resolve()
        if not secret.is_file():
            raise ConfigError(f"{secret}: no such passphrase file")
        _write(dropin, render_credential_dropin(secret))
    elif dropin.exists():
        dropin.unlink()

    unit = f"cssfs@{args.name}"
    print(f"wrote {unit_dir / UNIT_NAME} and {env_path}")
    print("start it now and at every login with:")
    print(f"  mkdir -p {shlex.quote(str(mountpoint))}")
    print(f"  systemctl --user daemon-reload && systemctl --user enable --now {unit}")
    print(f"logs: journalctl --user -u {unit}    stop (flushes uploads): "
          f"systemctl --user stop {unit}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    env_path = _env_path(args.name)
    if not env_path.exists():
        raise ConfigError(f"no service named {args.name!r} ({env_path} does not exist)")
    env_path.unlink()
    dropin_dir = _unit_dir(args) / f"cssfs@{args.name}.service.d"
    dropin = dropin_dir / "credential.conf"
    if dropin.exists():
        dropin.unlink()
        if not any(dropin_dir.iterdir()):
            dropin_dir.rmdir()
    print(f"removed {env_path}; if it was running: systemctl --user disable --now "
          f"cssfs@{args.name}")
    return 0
