"""suite crypto (issue 2): the CLI's encrypt/decrypt against bare AES-256-GCM, peak RSS on a big
file, and the per-file cost of sealing and opening a header.

What it measures, in this order (every cssfs figure beside a baseline of the same run):
- limits, in-process, one core, over the same bytes: AES-256-GCM in 64 KiB chunks
  (``AESGCM.encrypt_into``/``decrypt_into``), the same plus SHA-256 of every ciphertext chunk
  (format v1 keeps a SHA-256 table over the ciphertext, so that is the real ceiling), SHA-256
  alone;
- ``cssfs encrypt IN OUT`` and ``cssfs decrypt OUT BACK`` of the big file, files on tmpfs, wall
  time of the whole command (interpreter start-up included); BACK is compared with IN by sha256
  and OUT's size with ``envelope.envelope_size``;
- peak RSS (wait4 ru_maxrss) of encrypt/decrypt of the 1 GiB file, compared with the same
  commands on the big file (a ratio near 1 means memory does not grow with the file) and with
  the 64 MiB target;
- per-file cost, in-process: seal a 1-byte file for 1 and 20 recipients
  (``EnvelopeWriter`` + ``seal_chunk`` + ``finish``) and open it (``open_header`` +
  ``load_table`` + ``open_chunk``), against N bare X25519 wraps + one Ed25519 signature
  (seal) and one unwrap + one verification (open).
"""

from __future__ import annotations

import sys
import time

from benchlib import limits
from benchlib.context import Ctx
from benchlib.report import MB, MiB
from benchlib.runner import BenchError, log, run_measured, sha256_file


def run(ctx: Ctx) -> None:
    rep = ctx.report
    sz = ctx.sizes
    big = sz.big
    mib = f"{big // MiB} MiB"
    src, src_sha = ctx.data_file("plain", big)
    with open(src, "rb") as f:
        data = memoryview(f.read())

    # -- limits ----------------------------------------------------------------------------
    f_seal = rep.figure("crypto.limit.aesgcm_seal", f"bare AES-256-GCM seal, 64 KiB chunks, {mib}",
                        "MB/s", higher_is_better=True, short="bare AES-GCM")
    f_seal_sha = rep.figure("crypto.limit.aesgcm_sha_seal",
                            f"bare AES-256-GCM seal + SHA-256 per chunk, {mib}", "MB/s",
                            higher_is_better=True, refs=[f_seal.key], short="AES-GCM + SHA-256")
    f_open = rep.figure("crypto.limit.aesgcm_open", f"bare AES-256-GCM open, 64 KiB chunks, {mib}",
                        "MB/s", higher_is_better=True, short="bare AES-GCM")
    f_open_sha = rep.figure("crypto.limit.aesgcm_sha_open",
                            f"bare SHA-256 + AES-256-GCM open per chunk, {mib}", "MB/s",
                            higher_is_better=True, refs=[f_open.key], short="AES-GCM + SHA-256")
    f_sha = rep.figure("crypto.limit.sha256", f"bare SHA-256, 64 KiB pieces, {mib}", "MB/s",
                       higher_is_better=True, refs=[f_seal.key], short="SHA-256")
    log("limits: bare AES-GCM / SHA-256")
    for _ in range(ctx.runs):
        f_seal.add(big / limits.aesgcm_seal(data) / MB)
        f_seal_sha.add(big / limits.aesgcm_seal(data, with_sha256=True) / MB)
        f_open.add(big / limits.aesgcm_open(data) / MB)
        f_open_sha.add(big / limits.aesgcm_open(data, with_sha256=True) / MB)
        f_sha.add(big / limits.sha256_only(data) / MB)
    del data

    cli = ctx.cssfs
    f_py = rep.figure("crypto.limit.python_start", "python start-up (`python -c pass`)", "s",
                      higher_is_better=False, short="python -c pass")
    f_start = rep.figure("crypto.cli_start", "cssfs CLI start-up (`cssfs --version`)", "s",
                         higher_is_better=False, refs=[f_py.key])
    f_idle_rss = rep.figure("crypto.cli_idle_rss", "cssfs CLI peak RSS doing nothing "
                            "(`cssfs --version`)", "MiB", higher_is_better=False,
                            short="idle CLI")
    for _ in range(ctx.runs):
        f_py.add(run_measured([sys.executable, "-c", "pass"]).wall_s)
        r = run_measured(cli.argv("--version"), env=cli.env())
        f_start.add(r.wall_s)
        f_idle_rss.add(r.maxrss_kib / 1024)

    # -- CLI throughput --------------------------------------------------------------------
    f_enc = rep.figure("crypto.cli.encrypt", f"cssfs encrypt {mib} (CLI, tmpfs → tmpfs)", "MB/s",
                       higher_is_better=True, refs=[f_seal.key, f_seal_sha.key])
    f_dec = rep.figure("crypto.cli.decrypt", f"cssfs decrypt {mib} (CLI, tmpfs → tmpfs)", "MB/s",
                       higher_is_better=True, refs=[f_open.key, f_open_sha.key])
    f_enc_rss = rep.figure("crypto.cli.encrypt_rss_big", f"cssfs encrypt {mib}: peak RSS", "MiB",
                           higher_is_better=False, refs=[f_idle_rss.key], short=mib)
    f_dec_rss = rep.figure("crypto.cli.decrypt_rss_big", f"cssfs decrypt {mib}: peak RSS", "MiB",
                           higher_is_better=False, refs=[f_idle_rss.key], short=mib)
    enc = ctx.data / "big.cssfs"
    back = ctx.data / "big.back"
    from cssfs import envelope

    for i in range(ctx.runs):
        log(f"cssfs encrypt/decrypt {mib}, run {i + 1}/{ctx.runs}")
        r = run_measured(cli.encrypt(src, enc), env=cli.env())
        if enc.stat().st_size != envelope.envelope_size(big):
            raise BenchError(f"encrypt wrote {enc.stat().st_size} bytes, format says "
                             f"{envelope.envelope_size(big)}")
        f_enc.add(big / r.wall_s / MB)
        f_enc_rss.add(r.maxrss_kib / 1024)
        r = run_measured(cli.decrypt(enc, back), env=cli.env())
        if sha256_file(back) != src_sha:
            raise BenchError("cssfs decrypt did not give back the bytes that were encrypted")
        f_dec.add(big / r.wall_s / MB)
        f_dec_rss.add(r.maxrss_kib / 1024)
        back.unlink()
    enc.unlink()
    ctx.drop_data_file("plain", big)

    # -- peak RSS on the large file --------------------------------------------------------
    gib = f"{sz.rss // MiB} MiB" if sz.rss < 1024 * MiB else f"{sz.rss // (1024 * MiB)} GiB"
    f_enc_rss_l = rep.figure("crypto.cli.encrypt_rss", f"cssfs encrypt {gib}: peak RSS", "MiB",
                             higher_is_better=False, refs=[f_enc_rss.key, f_idle_rss.key],
                             target=("<", 64))
    f_dec_rss_l = rep.figure("crypto.cli.decrypt_rss", f"cssfs decrypt {gib}: peak RSS", "MiB",
                             higher_is_better=False, refs=[f_dec_rss.key, f_idle_rss.key],
                             target=("<", 64))
    large, large_sha = ctx.data_file("plain", sz.rss)
    for i in range(ctx.runs):
        log(f"cssfs encrypt/decrypt {gib} (peak RSS), run {i + 1}/{ctx.runs}")
        r = run_measured(cli.encrypt(large, enc), env=cli.env())
        f_enc_rss_l.add(r.maxrss_kib / 1024)
        r = run_measured(cli.decrypt(enc, back), env=cli.env())
        f_dec_rss_l.add(r.maxrss_kib / 1024)
        if sha256_file(back) != large_sha:
            raise BenchError("cssfs decrypt of the large file did not round-trip")
        back.unlink()
        enc.unlink()
    ctx.drop_data_file("plain", sz.rss)

    per_file(ctx)


def per_file(ctx: Ctx) -> None:
    """Seal/open a 1-byte envelope for 1 and 20 recipients, in-process, vs bare operations."""
    from cssfs import envelope, keys

    rep = ctx.report
    me = keys.Identity.generate()
    others = [keys.Identity.generate().recipient for _ in range(19)]
    ops = limits.wrap_ops()
    f_wrap = rep.figure("crypto.limit.wrap", "bare X25519 wrap (ECDH+HKDF+AES-GCM 32 B)", "µs",
                        higher_is_better=False)
    f_unwrap = rep.figure("crypto.limit.unwrap", "bare X25519 unwrap", "µs",
                          higher_is_better=False)
    f_sign = rep.figure("crypto.limit.sign", "bare Ed25519 sign", "µs", higher_is_better=False)
    f_verify = rep.figure("crypto.limit.verify", "bare Ed25519 verify", "µs",
                          higher_is_better=False)
    t = ctx.sizes.perfile_time
    for _ in range(ctx.runs):
        f_wrap.add(limits.per_call(ops["wrap"], min_time=t) * 1e6)
        f_unwrap.add(limits.per_call(ops["unwrap"], min_time=t) * 1e6)
        f_sign.add(limits.per_call(ops["sign"], min_time=t) * 1e6)
        f_verify.add(limits.per_call(ops["verify"], min_time=t) * 1e6)

    for n in (1, 20):
        recipients = others[: n - 1]
        f_lim_seal = rep.figure(f"crypto.limit.seal_ops_{n}",
                                f"bare {n}× wrap + 1 sign (sum of medians)", "µs",
                                higher_is_better=False, short="bare ops")
        f_lim_open = rep.figure("crypto.limit.open_ops",
                                "bare 1 unwrap + 1 verify (sum of medians)", "µs",
                                higher_is_better=False, short="bare ops")
        f_s = rep.figure(f"crypto.perfile.seal_{n}",
                         f"seal a 1-byte file, {n} recipient{'s' if n > 1 else ''}", "µs",
                         higher_is_better=False, refs=[f_lim_seal.key])
        f_o = rep.figure(f"crypto.perfile.open_{n}",
                         f"open a 1-byte file, {n} recipient{'s' if n > 1 else ''}", "µs",
                         higher_is_better=False, refs=[f_lim_open.key])

        sealed: list[tuple[bytes, bytes, bytes]] = []

        def seal(recipients: list[keys.Recipient] = recipients,
                 sealed: list[tuple[bytes, bytes, bytes]] = sealed) -> None:
            w = envelope.EnvelopeWriter(me, recipients, mtime_ns=time.time_ns())
            ct = w.seal_chunk(b"x", last=True)
            header, table = w.finish()
            if not sealed:
                sealed.append((header, table, ct))

        seal()
        header, table, ct = sealed[0]
        if len(envelope.parse_header(header).stanzas) != n:
            raise BenchError(f"sealed header does not have {n} stanzas")

        def open_one(header: bytes = header, table: bytes = table, ct: bytes = ct) -> None:
            opened = envelope.open_header(header, me)
            opened.load_table(table)
            if opened.open_chunk(0, ct) != b"x":
                raise BenchError("opened 1-byte envelope has the wrong byte")

        for _ in range(ctx.runs):
            f_s.add(limits.per_call(seal, min_time=t) * 1e6)
            f_o.add(limits.per_call(open_one, min_time=t) * 1e6)
        # The limit figures are derived from the medians measured above (same run).
        assert f_wrap.median and f_sign.median and f_unwrap.median and f_verify.median
        f_lim_seal.add(n * f_wrap.median + f_sign.median)
        if not f_lim_open.samples:
            f_lim_open.add(f_unwrap.median + f_verify.median)

