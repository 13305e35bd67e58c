"""cmd_fsck: ``cssfs fsck STORE_URL`` -- check every object of a store and report.

What it knows: the command's options, its output (docs/CLI.md, "fsck") and exit status, which
identities it checks with (yours, plus the group keys you hold in that store). The checking is
cssfs.fsck's; store URLs are cmd_store's, the S3 options cli's. trio, the stores and boto3 are
imported inside the handler only, like every command module. It must not know FUSE.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cssfs.cli import CliError, ExitCode, add_store_options, exit_code_for, load_identity
from cssfs.cmd_store import Location, _opened, _run

if TYPE_CHECKING:
    from collections.abc import Callable

    from cssfs.cli import Subparsers
    from cssfs.fsck import FsckReport, Kind, Leftover
    from cssfs.progress import Progress

DEFAULT_OLDER_THAN_MIN = 60.0
_KINDS: tuple[Kind, ...] = ("damaged", "error", "unreadable", "foreign", "gone")


def register(commands: Subparsers) -> None:
    p = commands.add_parser(
        "fsck", help="check every object of a store",
        description="Check every object under STORE_URL (s3://bucket/prefix, a bucket name or a "
        "store folder) with one LIST: each file you can read is verified completely (header, "
        "writer's signature, every chunk; nothing is decrypted to disk), files you cannot read "
        "as far as possible without the key. Lists damaged files, files not readable by you, "
        "foreign objects, leftovers of interrupted uploads and conflict copies. Changes "
        "nothing unless --repair. Exit 17 if anything is damaged.",
    )
    p.add_argument("store", metavar="STORE_URL")
    p.add_argument(
        "--repair", action="store_true",
        help="remove what cssfs itself left behind and is certainly garbage: incomplete "
        "multipart uploads cssfs started, a store folder's temp files, stale upload markers -- "
        "only when idle for --older-than. Nothing else is ever changed: damaged files, "
        "foreign objects, other tools' uploads and conflict copies stay",
    )
    p.add_argument(
        "--older-than", metavar="MINUTES", type=_minutes, default=DEFAULT_OLDER_THAN_MIN,
        help=f"--repair leaves alone leftovers active in the last MINUTES (default "
        f"{DEFAULT_OLDER_THAN_MIN:.0f}): they may belong to an upload still running",
    )
    add_store_options(p)
    p.set_defaults(func=_fsck)


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of minutes: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"minutes must be 0 or more: {text!r}")
    return value


def _fsck(args: argparse.Namespace) -> int:
    from cssfs import config

    identity = load_identity(args)
    contacts = config.Contacts.load()
    loc = Location(args.store, args.store, "")
    bars: list[Progress] = []

    def progress(total: int) -> Callable[[int], object]:
        from cssfs.progress import Progress

        bars.append(Progress(total, f"fsck {args.store}", sys.stderr))
        return bars[-1].update

    async def work() -> FsckReport:
        from cssfs.fsck import Fsck
        from cssfs.groups import Groups
        from cssfs.policy import Trust

        async with _opened(loc, args) as store:
            trust = Trust.of(identity.recipient, contacts)
            groups = await Groups(store, identity, trust).load_identities()
            fsck = Fsck(
                store, [identity, *(g.identity for g in groups)], repair=args.repair,
                older_than=args.older_than * 60, progress=progress,
            )
            try:
                return await fsck.run()
            finally:
                for bar in bars:
                    bar.close()

    report = _run(args, work)
    for line in format_report(report):
        print(line)
    sys.stdout.flush()
    damaged = report.damaged
    if damaged:
        raise CliError(
            f"{len(damaged)} object(s) damaged (listed above)", ExitCode.DAMAGED
        )
    failures = [f.error for f in report.of("error")]
    failures += [x.error for x in report.leftovers]
    first = next((e for e in failures if e is not None), None)
    if first is not None:
        raise CliError(f"some objects could not be checked or removed: {first}",
                       exit_code_for(first))
    return ExitCode.OK


# -- output -----------------------------------------------------------------------------------


def _show(key: str) -> str:
    """A key on one line: control characters (a newline in a key...) escaped."""
    if key.isprintable():
        return key
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _leftover_line(x: Leftover) -> str:
    who = "by cssfs" if x.ours else "by another tool"
    if x.what == "upload marker":
        desc = "marker of a finished or aborted cssfs upload"
    else:
        desc = f"{x.what} {who}, {_human(x.size)}"
    return f"leftover: {_show(x.key)}: {desc}, idle {_duration(x.idle)}: {x.note}"


def format_report(report: FsckReport) -> list[str]:
    """The lines ``cssfs fsck`` prints: one per problem (``KIND: KEY: REASON``), grouped by
    kind in this order -- damaged, error, unreadable, foreign, gone, conflict, leftover -- and
    by key within a kind; then an indented summary."""
    lines = [
        f"{f.kind}: {_show(f.key)}: {f.reason}"
        for kind in _KINDS
        for f in report.of(kind)
    ]
    lines += [
        f"conflict: {_show(copy)}: conflict copy of {_show(original)}"
        for copy, original in report.conflict_copies
    ]
    lines += [_leftover_line(x) for x in report.leftovers]
    removed = sum(1 for x in report.leftovers if x.removed)
    errors = len(report.of("error")) + sum(1 for x in report.leftovers if x.error is not None)
    rows = [
        ("objects checked", str(report.objects)),
        ("bytes verified", f"{_human(report.bytes_verified)} ({report.bytes_verified} bytes)"),
        ("ok", str(report.ok)),
        ("damaged", str(len(report.damaged))),
        ("not readable by you", str(len(report.of("unreadable")))),
        ("foreign", str(len(report.of("foreign")))),
        ("folder markers", str(report.folders)),
        ("cssfs bookkeeping", str(report.bookkeeping)),
        ("upload leftovers", f"{len(report.leftovers)} ({removed} removed)"),
        ("conflict copies", str(len(report.conflict_copies))),
        ("errors", str(errors)),
    ]
    if report.of("gone"):
        rows.append(("deleted meanwhile", str(len(report.of("gone")))))
    width = max(len(name) for name, _ in rows)
    lines.append(f"fsck of {report.url}" + (" (repair)" if report.repair else "") + ":")
    lines += [f"  {name + ':':{width + 1}} {value}" for name, value in rows]
    return lines
