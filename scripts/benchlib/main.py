"""main: the command line of scripts/bench -- parse options, run suites under one cleanup
stack, write the JSON and print the Markdown table.

What it knows: the suite names and the order `all` runs them in. What it must not know: how any
suite measures anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchlib.context import Ctx
from benchlib.report import Report, environment
from benchlib.runner import BenchError, Cleanup, Interrupted, interrupt_reason, log

SUITES = ("crypto", "store", "mount", "rclone", "share")
# `all`: the rclone suite runs every mount-suite workload on cssfs too (plus rsync), with the
# same limits, so running `mount` as well would only measure the same figures twice.
ALL = ("crypto", "store", "rclone", "share")


def _suite(name: str) -> Callable[[Ctx], None]:
    if name == "crypto":
        from benchlib import suite_crypto

        return suite_crypto.run
    if name == "store":
        from benchlib import suite_store

        return suite_store.run
    if name == "mount":
        from benchlib import suite_fs

        return suite_fs.run_mount
    if name == "rclone":
        from benchlib import suite_fs

        return suite_fs.run_rclone
    if name == "share":
        from benchlib import suite_share

        return suite_share.run
    raise SystemExit(f"unknown suite {name!r}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark cssfs against its limits and rclone, on this machine only "
                    "(see docs/PERFORMANCE.md).",
    )
    p.add_argument("suite", choices=(*SUITES, "all"),
                   help="crypto (issue 2), store (3), mount (4), rclone (7), share (5), or all")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, 1 run: checks that the harness works, not a result")
    p.add_argument("--runs", type=int, default=None,
                   help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the JSON results (default: bench-results/ in the repo)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of mount points and rclone's cache (default: $TMPDIR or /tmp)")
    p.add_argument("--datadir", type=Path, default=None,
                   help="parent of the plaintext test files (default: /dev/shm)")
    p.add_argument("--systems", default=None,
                   help="comma-separated subset of cssfs,rclone_writes,rclone_full for the "
                        "mount/rclone suites (default: all of the suite's)")
    args = p.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    repo = Path(__file__).resolve().parents[2]
    out_dir = args.out or (repo / "bench-results")
    names = list(ALL) if args.suite == "all" else [args.suite]

    report = Report(args.suite, ["scripts/bench", *argv], args.quick, runs)
    report.env = environment(repo)
    report.env["root"] = os.geteuid() == 0
    report.env["loadavg_start"] = os.getloadavg()
    status = 0
    t0 = time.monotonic()
    with Cleanup() as cleanup:
        ctx = Ctx(repo, report, cleanup, quick=args.quick, runs=runs, workdir=args.workdir,
                  datadir=args.datadir)
        ctx.systems = args.systems.split(",") if args.systems else None
        ctx.logs = out_dir / "logs"
        try:
            for name in names:
                log(f"suite {name}: start")
                t_suite = time.monotonic()
                try:
                    _suite(name)(ctx)
                except BenchError as exc:
                    report.error(f"suite {name}: {exc}")
                    status = 1
                log(f"suite {name}: done in {time.monotonic() - t_suite:.0f}s")
        except (Interrupted, KeyboardInterrupt) as exc:
            why = "; ".join(interrupt_reason) or str(exc)
            report.error(f"interrupted ({why}); partial results")
            status = 130
        except Exception as exc:  # a bug in the harness: still report what was measured
            traceback.print_exc()
            report.error(f"harness error: {exc!r}"
                         + (f" (after: {'; '.join(interrupt_reason)})" if interrupt_reason else ""))
            status = 2
        finally:
            log("cleaning up")
    report.env["wall_s"] = round(time.monotonic() - t0, 1)
    report.env["loadavg_end"] = os.getloadavg()
    if report.env["loadavg_start"][0] > 1.5 or report.env["loadavg_end"][2] > 3:
        report.note(f"the machine was busy (load average {report.env['loadavg_start'][0]:.1f} "
                    f"at start, {report.env['loadavg_end'][2]:.1f} over the last 15 min at the "
                    "end): figures are noisier than usual")
    path = report.write_json(out_dir)
    sys.stdout.write(report.markdown())
    log(f"results: {path}")
    return status
