"""The original CloudSecureShare workflow (ORIGIN.md), through the cssfs CLI, on moto's S3 over
HTTP: the recipient makes keys (PEM export as in the original), the sender encrypts and uploads
(``cssfs put -r recipient_public_key.pem``), the recipient downloads and decrypts
(``cssfs get``), byte for byte -- for an empty, a small and a 50 MiB file. Then ls, cat, rm,
and tampering in the bucket behind cssfs's back (boto3): flip a byte, truncate, swap two
objects, replace one with plaintext; ``cssfs get`` must fail with the right exit code and leave
no DEST file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cssfs.cli import ExitCode
from cssfs.envelope import CHUNK_SIZE, chunk_range
from tests.support.clirun import Result, ok, private_home, runner

pytestmark = pytest.mark.s3

CANARY = b"CANARY-workflow-c0ffee: plaintext that stays on the ends\n"
REPO = Path(__file__).resolve().parent.parent
BIG = 50 * 1024 * 1024


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    yield private_home(monkeypatch, tmp_path)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    return runner(capsys)


def fails(result: Result, code: ExitCode) -> Result:
    assert result.code == code, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cssfs: error: "), result.err
    assert "Traceback" not in result.err and "CANARY" not in result.err
    return result


@dataclass
class World:
    work: Path
    url: str  # s3://bucket
    s3: list[str]  # the S3 options for every command
    bob: str  # the recipient's identity file
    client: Any  # a raw boto3 client: the untrusted cloud
    bucket: str


@pytest.fixture
def world(env: Path, run: Callable[..., Result], s3_bucket: Any) -> World:
    import boto3

    # 1. Key generation: the recipient makes an identity and exports the PEM pair.
    bob = env / "bob" / "identity"
    bob.parent.mkdir()
    ok(run("keygen", "--no-passphrase", "-o", str(bob)))
    ok(run("-i", str(bob), "export", "--pem", "-d", str(bob.parent)))
    assert (bob.parent / "recipient_public_key.pem").is_file()
    # The sender has an identity of their own (they sign what they upload).
    ok(run("keygen", "--no-passphrase"))
    client = boto3.client("s3", endpoint_url=s3_bucket.endpoint)
    return World(
        env, f"s3://{s3_bucket.bucket}", ["--endpoint-url", s3_bucket.endpoint, "--path-style"],
        str(bob), client, s3_bucket.bucket,
    )


def test_original_workflow(world: World, run: Callable[..., Result]) -> None:
    w = world
    files = {
        "empty.txt": b"",
        "sample.txt": CANARY * 20,
        "big.bin": os.urandom(BIG),
    }
    for name, data in files.items():
        (w.work / name).write_bytes(data)
    pem = str(Path(w.bob).parent / "recipient_public_key.pem")

    # 2 + 3. Encrypt for the recipient's public key and upload.
    ok(run("put", "-r", pem, *files, f"{w.url}/share/", *w.s3))
    stored = w.client.list_objects_v2(Bucket=w.bucket)["Contents"]
    assert sorted(o["Key"] for o in stored) == [f"share/{n}" for n in sorted(files)]
    sample = w.client.get_object(Bucket=w.bucket, Key="share/sample.txt")["Body"].read()
    assert CANARY not in sample  # the cloud sees ciphertext only

    # 4 + 5. The recipient downloads and decrypts, byte for byte.
    out = w.work / "bob-downloads"
    out.mkdir()
    for name, data in files.items():
        ok(run("-i", w.bob, "get", f"{w.url}/share/{name}", str(out), *w.s3))
        assert (out / name).read_bytes() == data, name
    assert sorted(os.listdir(out)) == sorted(files)

    # ls: one LIST (+ header GETs with -l), plaintext sizes, who wrote, who can read.
    assert ok(run("ls", f"{w.url}/share", *w.s3)).out.split() == sorted(files)
    assert ok(run("ls", w.url, *w.s3)).out == "share/\n"
    long = {
        line.split()[-1]: line.split()
        for line in ok(run("-i", w.bob, "ls", "-l", f"{w.url}/share/", *w.s3)).out.splitlines()
    }
    assert long["big.bin"][1] == str(BIG) and long["empty.txt"][1] == "0"
    assert long["sample.txt"][-2] == "yes"  # bob can read it; the writer is not his contact
    assert long["sample.txt"][-3] != "you"
    mine = {line.split()[-1]: line.split()
            for line in ok(run("ls", "-l", f"{w.url}/share/", *w.s3)).out.splitlines()}
    assert mine["sample.txt"][-3:] == ["you", "yes", "sample.txt"]

    assert ok(run("-i", w.bob, "cat", f"{w.url}/share/sample.txt", *w.s3)).out == \
        (CANARY * 20).decode()
    ok(run("rm", f"{w.url}/share/big.bin", *w.s3))
    assert ok(run("ls", f"{w.url}/share/", *w.s3)).out.split() == ["empty.txt", "sample.txt"]
    ok(run("rm", "-r", f"{w.url}/share", *w.s3))
    assert w.client.list_objects_v2(Bucket=w.bucket).get("KeyCount") == 0


def test_cli_subprocess_with_endpoint_from_environment(world: World) -> None:
    """``python -m cssfs`` with the endpoint in AWS_ENDPOINT_URL_S3 (as the mount unit gets it):
    stdout is the data, stderr stays empty."""
    w = world
    (w.work / "note.txt").write_bytes(CANARY)
    env = dict(os.environ)
    env["AWS_ENDPOINT_URL_S3"] = w.s3[1]
    env["PYTHONPATH"] = str(REPO)

    def cssfs(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "cssfs", *argv], cwd=w.work, env=env,
            capture_output=True, timeout=120, check=False,
        )

    put = cssfs("put", "-r", str(Path(w.bob).parent / "recipient_public_key.pem"), "note.txt",
                f"{w.url}/n/note.txt", "--path-style")
    assert (put.returncode, put.stderr) == (0, b""), put
    got = cssfs("-i", w.bob, "cat", f"{w.url}/n/note.txt", "--path-style")
    assert (got.returncode, got.stdout, got.stderr) == (0, CANARY, b""), got
    missing = cssfs("-i", w.bob, "get", f"{w.url}/n/none", "--path-style")
    assert missing.returncode == ExitCode.NOT_FOUND
    assert missing.stderr.count(b"\n") == 1 and missing.stderr.startswith(b"cssfs: error: ")


def _raw(w: World, key: str) -> bytes:
    body: bytes = w.client.get_object(Bucket=w.bucket, Key=key)["Body"].read()
    return body


def _replace(w: World, key: str, data: bytes) -> None:
    w.client.put_object(Bucket=w.bucket, Key=key, Body=data)


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("flip", ExitCode.PAYLOAD),
        ("truncate", ExitCode.PAYLOAD),
        ("swap", ExitCode.HEADER_AUTH),
        ("plaintext", ExitCode.BAD_INPUT),
    ],
)
def test_tampering_in_the_bucket(
    world: World, run: Callable[..., Result], damage: str, code: ExitCode
) -> None:
    w = world
    data = CANARY * (3 * CHUNK_SIZE // len(CANARY) + 5)
    (w.work / "a.txt").write_bytes(data)
    (w.work / "b.txt").write_bytes(data[::-1])
    ok(run("put", "a.txt", "b.txt", f"{w.url}/t/", *w.s3))
    a, b = _raw(w, "t/a.txt"), _raw(w, "t/b.txt")
    if damage == "flip":
        blob = bytearray(a)
        off, _ = chunk_range(3, len(data))
        blob[off + 1] ^= 0x80
        _replace(w, "t/a.txt", bytes(blob))
    elif damage == "truncate":
        off, _ = chunk_range(3, len(data))
        _replace(w, "t/a.txt", a[:off])
    elif damage == "swap":
        _replace(w, "t/a.txt", b)
        _replace(w, "t/b.txt", a)
    else:
        _replace(w, "t/a.txt", data)  # the plaintext itself, never encrypted

    dest = w.work / "restored.txt"
    result = fails(run("get", f"{w.url}/t/a.txt", str(dest), *w.s3), code)
    assert "t/a.txt" in result.err
    assert not dest.exists()
    assert sorted(os.listdir(w.work)) == ["a.txt", "b.txt", "bob"]  # no temporary file left
    fails(run("cat", f"{w.url}/t/a.txt", *w.s3), code)
