"""suite store (issue 3): `cssfs put` / `cssfs get` against boto3 upload_file / download_file of
the same bytes to the same server, and their peak RSS on a 1 GiB file.

Both sides run as child processes started the same way (`python -m cssfs ...` and
`python benchlib/rawxfer.py ...`), so both pay an interpreter start and the ratio compares the
commands a user would run. Wall time and ``ru_maxrss`` come from ``wait4()`` of the child.
Every `get` output is sha256-checked against the source; every `put` must leave an object of
``envelope_size(n)`` bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchlib import s3
from benchlib.context import Ctx
from benchlib.report import MB, GiB, MiB
from benchlib.runner import BenchError, log, run_measured, sha256_file

RAWXFER = Path(__file__).resolve().parent / "rawxfer.py"


def _size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB"


def run(ctx: Ctx) -> None:
    cli = ctx.cssfs
    if not (cli.has_command("put") and cli.has_command("get")):
        ctx.report.error("store: `cssfs put`/`cssfs get` do not exist yet; suite skipped")
        return
    from cssfs import envelope

    rep, sz = ctx.report, ctx.sizes
    endpoint = ctx.s3.endpoint
    env = cli.env(s3.s3_env(endpoint))
    c = s3.client(endpoint)
    bucket = s3.new_bucket(c, "store")

    def raw(op: str, key: str, path: Path) -> tuple[float, float]:
        r = run_measured([sys.executable, str(RAWXFER), op, bucket, key, str(path)], env=env)
        return r.wall_s, r.maxrss_kib / 1024

    def cssfs(op: str, key: str, path: Path) -> tuple[float, float]:
        argv = cli.put(path, bucket, key) if op == "put" else cli.get(bucket, key, path)
        r = run_measured(argv, env=env)
        return r.wall_s, r.maxrss_kib / 1024

    for size, tag in ((sz.big, "big"), (sz.rss, "rss")):
        name = _size(size)
        src, sha = ctx.data_file("plain", size)
        back = ctx.data / "store-back"
        F = rep.figure
        lp = F(f"store.limit.put_{tag}", f"limit: boto3 upload_file {name} (child process)",
               "MB/s", higher_is_better=True, short="boto3")
        lg = F(f"store.limit.get_{tag}", f"limit: boto3 download_file {name} (child process)",
               "MB/s", higher_is_better=True, short="boto3")
        lpr = F(f"store.limit.put_rss_{tag}", f"limit: boto3 upload_file {name}: peak RSS",
                "MiB", higher_is_better=False, short="boto3")
        lgr = F(f"store.limit.get_rss_{tag}", f"limit: boto3 download_file {name}: peak RSS",
                "MiB", higher_is_better=False, short="boto3")
        target = ("<", 128.0) if tag == "rss" else None
        fp = F(f"store.put_{tag}", f"cssfs put {name}", "MB/s", higher_is_better=True,
               refs=[lp.key], target=(">=", 0.8) if tag == "big" else None,
               target_on=f"ratio:{lp.key}" if tag == "big" else None)
        fg = F(f"store.get_{tag}", f"cssfs get {name}", "MB/s", higher_is_better=True,
               refs=[lg.key], target=(">=", 0.8) if tag == "big" else None,
               target_on=f"ratio:{lg.key}" if tag == "big" else None)
        fpr = F(f"store.put_rss_{tag}", f"cssfs put {name}: peak RSS", "MiB",
                higher_is_better=False, refs=[lpr.key], target=target)
        fgr = F(f"store.get_rss_{tag}", f"cssfs get {name}: peak RSS", "MiB",
                higher_is_better=False, refs=[lgr.key], target=target)
        for i in range(ctx.runs):
            log(f"store {name}, run {i + 1}/{ctx.runs}")
            # alternate who goes first, so server-side warm-up does not favour one side
            order = ("raw", "cssfs") if i % 2 == 0 else ("cssfs", "raw")
            for who in order:
                key = f"{who}-{tag}-{i}"
                do = raw if who == "raw" else cssfs
                t_put, rss_put = do("put", key, src)
                head = c.head_object(Bucket=bucket, Key=key)
                want = size if who == "raw" else envelope.envelope_size(size)
                if int(head["ContentLength"]) != want:
                    raise BenchError(f"{who} put left {head['ContentLength']} bytes, "
                                     f"expected {want}")
                t_get, rss_get = do("get", key, back)
                if sha256_file(back) != sha:
                    raise BenchError(f"{who} get returned different bytes")
                back.unlink()
                c.delete_object(Bucket=bucket, Key=key)
                if who == "raw":
                    lp.add(size / t_put / MB)
                    lg.add(size / t_get / MB)
                    lpr.add(rss_put)
                    lgr.add(rss_get)
                else:
                    fp.add(size / t_put / MB)
                    fg.add(size / t_get / MB)
                    fpr.add(rss_put)
                    fgr.add(rss_get)
        ctx.drop_data_file("plain", size)
