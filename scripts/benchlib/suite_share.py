"""suite share (issue 5): `cssfs share` and `cssfs unshare` of a folder of N files on S3.

Per run, in a fresh folder of the bucket: Alice uploads N files (`cssfs put -R`, unclocked
here), then, each clocked as the whole CLI command and with the bytes on the wire counted by
the relay in benchlib/proxy.py:
- `cssfs share --store s3://B FOLDER BOB`: a stanza for Bob on every file, by rewriting only
  each file's 4 KiB header. Checked: Bob's identity opens every object and its plaintext
  matches the source (in-process, ``envstream.decrypt_stream`` over the raw object).
- `cssfs unshare --store s3://B FOLDER BOB`: every file re-encrypted under a fresh key without
  Bob. Checked: Bob opens none of them; Alice opens all and gets the source back.

Limits, same run, same server: re-uploading the payload (boto3 PUT of the same N files,
8 threads) -- what sharing would cost without header rewrites; N x 4 KiB PUTs with 8 threads
-- the floor for touching N objects; downloading and re-uploading the payload (GET + PUT,
8 threads) -- the floor for unshare. Bytes uploaded are compared with the payload size.
"""

from __future__ import annotations

import io
import random
import time
from functools import partial
from typing import Any
from urllib.parse import urlparse

from benchlib import s3
from benchlib.context import Ctx
from benchlib.cssfs_cli import CssfsCli
from benchlib.proxy import CountingProxy
from benchlib.report import MiB
from benchlib.runner import BenchError, log, run_measured


def _decrypt_all(c: Any, bucket: str, keys: dict[str, str], identity: Any,
                 files: dict[str, bytes]) -> int:
    """How many objects ``identity`` opens; BenchError if an opened one has the wrong bytes."""
    from cssfs import envstream
    from cssfs.errors import CssfsError

    opened = 0
    for rel, key in keys.items():
        raw = c.get_object(Bucket=bucket, Key=key)["Body"].read()
        out = io.BytesIO()
        try:
            envstream.decrypt_stream(io.BytesIO(raw), out, identity)
        except CssfsError:
            continue
        if out.getvalue() != files[rel]:
            raise BenchError(f"{rel}: decrypted bytes differ from the source")
        opened += 1
    return opened


def run(ctx: Ctx) -> None:
    alice = ctx.cssfs
    if not (alice.has_command("share") and alice.has_command("unshare")):
        ctx.report.error("share: `cssfs share`/`unshare` do not exist; suite skipped")
        return
    bob = CssfsCli(ctx.repo, ctx.work / "cssfs-home-bob")
    # Many files below the multipart part size (their header rewrite re-sends the object), and
    # a few large ones (header rewritten by a server-side copy of the payload).
    # The folder: 100 files, 1 GiB in all (10 MiB each, above the 5 MiB S3 part minimum).
    sets = ([(12, 256 * 1024, "small"), (2, 16 * MiB, "large")] if ctx.quick
            else [(100, 1 * MiB, "small"), (100, 10 * MiB, "1gib")])
    for n, size, tag in sets:
        one_set(ctx, alice, bob, n, size, tag)
    open_cost(ctx)


def open_cost(ctx: Ctx) -> None:
    """Per-open cost of a file as one of 40 recipients vs as its only recipient, in-process.

    What an open costs in crypto (``open_header``: parse, find our stanza by its key id, one
    unwrap, commitment, header MAC, signature) for the *last* of 40 stanzas -- the worst place --
    and for a file with one stanza. The GET that precedes an open is the same for both.
    """
    from cssfs import envelope, keys

    rep = ctx.report
    writer = keys.Identity.generate()
    others = [keys.Identity.generate() for _ in range(39)]
    reader = others[-1]
    w = envelope.EnvelopeWriter(writer, [o.recipient for o in others])
    w.seal_chunk(b"x", last=True)
    header40, _ = w.finish()
    w = envelope.EnvelopeWriter(writer, [])
    w.seal_chunk(b"x", last=True)
    header1, _ = w.finish()
    if len(envelope.parse_header(header40).stanzas) != 40:
        raise BenchError("the 40-recipient header does not hold 40 stanzas")
    f_one = rep.figure("share.open.1", "open a file's header as its only recipient", "µs",
                       higher_is_better=False, short="only recipient")
    f_forty = rep.figure("share.open.40", "open a file's header as the 40th of 40 recipients",
                         "µs", higher_is_better=False, refs=[f_one.key])
    iterations = 50 if ctx.quick else 400

    def per_open(header: bytes, identity: keys.Identity) -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            envelope.open_header(header, identity)
        return (time.perf_counter() - start) / iterations * 1e6

    for _ in range(ctx.runs):
        f_one.add(per_open(header1, writer))
        f_forty.add(per_open(header40, reader))


def one_set(ctx: Ctx, alice: CssfsCli, bob: CssfsCli, n: int, size: int, tag: str) -> None:
    from cssfs import keys

    rep = ctx.report
    total = n * size
    bob_recipient = bob.whoami()
    bob_id = keys.parse_identity_file(bob.identity.read_bytes(), None)
    alice_id = keys.parse_identity_file(alice.identity.read_bytes(), None)

    rng = random.Random(11)
    src = ctx.data / f"share-src-{tag}"
    src.mkdir(exist_ok=True)
    files: dict[str, bytes] = {}
    for i in range(n):
        rel = f"f{i:04d}.bin"
        files[rel] = rng.randbytes(size)
        (src / rel).write_bytes(files[rel])

    c = s3.client(ctx.s3.endpoint)
    bucket = s3.new_bucket(c, "share")
    u = urlparse(ctx.s3.endpoint)
    F = rep.figure
    what = (f"{n} files × {size // MiB} MiB" if size >= MiB
            else f"{n} files × {size // 1024} KiB")
    l_reup = F(f"share.{tag}.limit.reupload", f"limit: boto3 PUT of the {what}, 8 threads", "s",
               higher_is_better=False, short="re-upload")
    l_touch = F(f"share.{tag}.limit.touch", f"limit: {n} × 4 KiB PUT, 8 threads", "s",
                higher_is_better=False, short="N × 4 KiB PUT")
    l_rekey = F(f"share.{tag}.limit.getput",
                f"limit: boto3 GET + PUT of the {what}, 8 threads", "s", higher_is_better=False,
                short="GET + PUT")
    l_bytes = F(f"share.{tag}.limit.payload", f"limit: payload bytes of the {what}", "MiB",
                higher_is_better=False, short="payload")
    l_put = F(f"share.{tag}.limit.cli_put", f"cssfs put of the {what}, one command (for scale)",
              "s", higher_is_better=False, refs=[l_reup.key])
    f_share = F(f"share.{tag}.share", f"cssfs share of a folder of {what}", "s",
                higher_is_better=False, refs=[l_reup.key, l_touch.key])
    f_share_up = F(f"share.{tag}.share_up", f"cssfs share ({what}): bytes uploaded", "MiB",
                   higher_is_better=False, refs=[l_bytes.key])
    f_share_down = F(f"share.{tag}.share_down", f"cssfs share ({what}): bytes downloaded", "MiB",
                     higher_is_better=False, refs=[l_bytes.key])
    f_unshare = F(f"share.{tag}.unshare", f"cssfs unshare of the folder of {what}", "s",
                  higher_is_better=False, refs=[l_rekey.key, l_reup.key])
    f_unshare_up = F(f"share.{tag}.unshare_up", f"cssfs unshare ({what}): bytes uploaded", "MiB",
                     higher_is_better=False, refs=[l_bytes.key])
    l_bytes.add(total / MiB)

    for i in range(ctx.runs):
        log(f"share {what}, run {i + 1}/{ctx.runs}")
        folder = f"docs-{tag}-{i}"
        # limits first, in their own prefix
        items = {f"raw-{tag}-{i}/{rel}": data for rel, data in files.items()}
        l_reup.add(s3.timed(partial(s3.put_many, c, bucket, items)))
        small = {f"raw4k-{tag}-{i}/{rel}": data[:4096] for rel, data in files.items()}
        l_touch.add(s3.timed(partial(s3.put_many, c, bucket, small)))
        l_rekey.add(s3.timed(partial(_get_put_many, c, bucket, list(items))))
        s3.empty_bucket(c, bucket, f"raw-{tag}-{i}/")
        s3.empty_bucket(c, bucket, f"raw4k-{tag}-{i}/")

        env = alice.env(s3.s3_env(ctx.s3.endpoint))
        r = run_measured(alice.argv("put", *(str(src / rel) for rel in files),
                                    f"s3://{bucket}/{folder}/"), env=env)
        l_put.add(r.wall_s)
        listing = {o["Key"]: o for o in s3.list_all(c, bucket, f"{folder}/")}
        keys_by_rel = {rel: f"{folder}/{rel}" for rel in files}
        missing = [k for k in keys_by_rel.values() if k not in listing]
        if missing:
            raise BenchError(f"cssfs put -R did not store {len(missing)} files "
                             f"(e.g. {missing[:2]}; found {sorted(listing)[:3]})")
        if _decrypt_all(c, bucket, keys_by_rel, bob_id, files) != 0:
            raise BenchError("Bob can read files before they were shared")

        proxy = CountingProxy(u.hostname or "127.0.0.1", u.port or 80)
        try:
            penv = alice.env(s3.s3_env(proxy.endpoint))
            r = run_measured(alice.argv("share", "--store", f"s3://{bucket}", folder,
                                        bob_recipient), env=penv)
            f_share.add(r.wall_s)
            f_share_up.add(proxy.up / MiB)
            f_share_down.add(proxy.down / MiB)
            got = _decrypt_all(c, bucket, keys_by_rel, bob_id, files)
            if got != n:
                raise BenchError(f"after share Bob opens {got} of {n} files")
            proxy.reset()
            r = run_measured(alice.argv("unshare", "--store", f"s3://{bucket}", folder,
                                        bob_recipient), env=penv)
            f_unshare.add(r.wall_s)
            f_unshare_up.add(proxy.up / MiB)
        finally:
            proxy.close()
        if _decrypt_all(c, bucket, keys_by_rel, bob_id, files) != 0:
            raise BenchError("after unshare Bob still opens some files")
        if _decrypt_all(c, bucket, keys_by_rel, alice_id, files) != n:
            raise BenchError("after unshare Alice cannot open every file")
        s3.empty_bucket(c, bucket, f"{folder}/")


def _get_put_many(c: Any, bucket: str, keys: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(key: str) -> None:
        data = c.get_object(Bucket=bucket, Key=key)["Body"].read()
        c.put_object(Bucket=bucket, Key=key + ".re", Body=data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, keys))

