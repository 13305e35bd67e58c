"""report: figures, their statistics and ratios, and the JSON + Markdown output of a bench run.

What it knows: samples (floats) under a name and a unit, which way is better, which other
figure of the same run a figure is compared with, and an optional target. What it must not
know: how a figure was measured (suites do that), cssfs, stores or mounts.

Every ratio is ``median(this) / median(reference)`` whatever the unit, so 0.8 on a MB/s row means
"80 % of the reference's throughput" and 2.0 on a latency row means "twice the latency"; the
table's "better" column says which way is good.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1_000_000  # MB/s = 10^6 B/s, as the reference figures in docs/PERFORMANCE.md
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Figure:
    """One measured quantity: its samples (one per run) and what it is compared with."""

    key: str                      # unique within a run, e.g. "crypto.encrypt.cli"
    label: str                    # what a reader sees, e.g. "cssfs encrypt 256 MiB"
    unit: str                     # "MB/s", "s", "ms", "MiB", "ops/s", "files/s", "µs", "count"
    higher_is_better: bool
    samples: list[float] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)   # keys of the figures this is compared with
    target: tuple[str, float] | None = None          # (">=" | "<=" | "<", value) on the median
    target_on: str | None = None                     # "ratio:<ref key>" -> target applies to ratio
    note: str = ""
    short: str = ""                                  # how a ratio cell names this figure

    @property
    def name(self) -> str:
        return self.short or self.label

    def add(self, value: float) -> None:
        self.samples.append(float(value))

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def spread(self) -> str:
        if not self.samples:
            return "n/a"
        return f"{_fmt(min(self.samples))}–{_fmt(max(self.samples))}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


class Report:
    """All figures of one run, in the order they were declared, plus run metadata."""

    def __init__(self, suite: str, argv: list[str], quick: bool, runs: int) -> None:
        self.suite = suite
        self.argv = argv
        self.quick = quick
        self.runs = runs
        self.started = time.time()
        self.figures: dict[str, Figure] = {}
        self.notes: list[str] = []
        self.errors: list[str] = []
        self.env: dict[str, Any] = {}

    def figure(
        self, key: str, label: str, unit: str, *, higher_is_better: bool,
        refs: list[str] | None = None, target: tuple[str, float] | None = None,
        target_on: str | None = None, note: str = "", short: str = "",
    ) -> Figure:
        """The figure ``key``, declared on first use (later calls return the same object)."""
        fig = self.figures.get(key)
        if fig is None:
            fig = Figure(key, label, unit, higher_is_better, [], list(refs or []), target,
                         target_on, note, short)
            self.figures[key] = fig
        return fig

    def add(self, key: str, value: float) -> None:
        self.figures[key].add(value)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", file=sys.stderr, flush=True)

    def error(self, text: str) -> None:
        self.errors.append(text)
        print(f"  ERROR: {text}", file=sys.stderr, flush=True)

    def ratio(self, fig: Figure, ref_key: str) -> float | None:
        ref = self.figures.get(ref_key)
        if ref is None or fig.median is None or ref.median in (None, 0):
            return None
        assert ref.median is not None
        return fig.median / ref.median

    def target_status(self, fig: Figure) -> str:
        if fig.target is None:
            return ""
        op, want = fig.target
        if fig.target_on and fig.target_on.startswith("ratio:"):
            value = self.ratio(fig, fig.target_on[len("ratio:"):])
            what = "ratio"
        else:
            value, what = fig.median, fig.unit
        if value is None:
            return f"target {op} {_fmt(want)} {what}: n/a"
        ok = {">=": value >= want, "<=": value <= want, "<": value < want, ">": value > want}[op]
        return f"{'PASS' if ok else 'FAIL'} ({op} {_fmt(want)} {what})"

    # -- output -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        figs = []
        for fig in self.figures.values():
            figs.append({
                "key": fig.key, "label": fig.label, "unit": fig.unit,
                "higher_is_better": fig.higher_is_better, "samples": fig.samples,
                "median": fig.median,
                "min": min(fig.samples) if fig.samples else None,
                "max": max(fig.samples) if fig.samples else None,
                "ratios": {r: self.ratio(fig, r) for r in fig.refs},
                "target": list(fig.target) if fig.target else None,
                "target_on": fig.target_on, "target_status": self.target_status(fig),
                "note": fig.note,
            })
        return {
            "suite": self.suite, "argv": self.argv, "quick": self.quick, "runs": self.runs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "duration_s": round(time.time() - self.started, 1),
            "env": self.env, "figures": figs, "notes": self.notes, "errors": self.errors,
        }

    def write_json(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        path = out_dir / f"{self.suite}{'-quick' if self.quick else ''}-{stamp}.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def markdown(self) -> str:
        lines = [
            f"### cssfs bench `{self.suite}`{' (--quick)' if self.quick else ''} — "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(self.started))}",
            "",
            f"`{' '.join(self.argv)}` · runs per figure: {self.runs} · "
            f"{self.env.get('machine', '')} · commit {self.env.get('commit', '?')}"
            f"{' (dirty)' if self.env.get('dirty') else ''} · "
            f"{self.env.get('wall_s', '?')} s",
        ]
        titles = {"crypto": "crypto (issue 2)", "store": "store (issue 3)",
                  "fs": "mount (issues 4, 7)", "share": "share (issue 5)"}
        group = None
        for fig in self.figures.values():
            g = fig.key.split(".", 1)[0]
            if g != group:
                group = g
                lines += [
                    "", f"#### {titles.get(g, g)}", "",
                    "| figure | median | min–max | unit | better | ratio (median / median) "
                    "| target |",
                    "|---|---:|---:|---|---|---|---|",
                ]
            ratios = []
            for ref_key in fig.refs:
                ref = self.figures.get(ref_key)
                r = self.ratio(fig, ref_key)
                name = ref.name if ref else ref_key
                ratios.append(f"{_fmt(r)}× {name}" if r is not None else f"n/a vs {name}")
            lines.append(
                f"| {fig.label} | {_fmt(fig.median)} | {fig.spread()} | {fig.unit} | "
                f"{'↑' if fig.higher_is_better else '↓'} | {'; '.join(ratios)} | "
                f"{self.target_status(fig)} |"
            )
        if self.notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        if self.errors:
            lines += ["", "**Errors:**"] + [f"- {e}" for e in self.errors]
        return "\n".join(lines) + "\n"


def environment(repo: Path) -> dict[str, Any]:
    """What a reader needs to compare runs: machine, kernel, versions, commit."""

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20,
                                  cwd=repo).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    env: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {cpu}, kernel {platform.release()}",
        "python": sys.version.split()[0],
        "commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": bool(out(["git", "status", "--porcelain", "--untracked-files=no"])),
        "rclone": out(["rclone", "version"]).splitlines()[0] if out(["rclone", "version"]) else "",
    }
    for mod in ("cryptography", "boto3", "moto", "pyfuse3", "trio"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod)
        except Exception:
            env[mod] = "?"
    return env
