"""The store commands in-process (put, get, cat, ls, rm) on a local store folder; locations,
upload plans and the progress bar as units. The same commands on S3: tests/test_workflow.py.

Every success prints nothing on stderr; every failure is one ``cssfs: error:`` line with its
exit code, never a traceback, never plaintext (CANARY).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from cssfs import cli
from cssfs.cli import ExitCode
from cssfs.cmd_store import Location, Upload, parse_location, plan_uploads
from cssfs.envelope import CHUNK_SIZE, chunk_range
from cssfs.progress import Progress
from tests.support.clirun import Result, Run, ok

CANARY = b"CANARY-cmdstore-5e21: never in a log or an error\n"


def fails(result: Result, code: ExitCode) -> Result:
    assert result.code == code, result
    assert result.out == "" or result.code == ExitCode.OK
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cssfs: error: "), result.err
    assert "Traceback" not in result.err and CANARY.decode() not in result.err
    return result


@pytest.fixture
def people(env: Path, run: Run) -> dict[str, str]:
    """me (the default identity), alice (alice.id, a contact) and eve (eve.id, a stranger)."""
    me = ok(run("keygen", "--no-passphrase")).out.split()[0]
    alice = ok(run("keygen", "--no-passphrase", "-o", str(env / "alice.id"))).out.split()[0]
    eve = ok(run("keygen", "--no-passphrase", "-o", str(env / "eve.id"))).out.split()[0]
    ok(run("contacts", "add", "alice", alice))
    return {"me": me, "alice": alice, "eve": eve}


@pytest.fixture
def bucket(env: Path) -> Path:
    root = env.parent / "bucket"
    root.mkdir()
    return root


# -- locations and plans ---------------------------------------------------------------------


def test_parse_location_s3_and_memory() -> None:
    assert parse_location("s3://b/a/c.txt") == Location("s3://b/a/c.txt", "s3://b", "a/c.txt")
    assert parse_location("s3://b") == Location("s3://b", "s3://b", "")
    loc = parse_location("s3://b/dir/")
    assert loc.is_folder and loc.key == "dir/"
    assert loc.where("dir/x") == "s3://b/dir/x"
    assert parse_location("memory://n/k").store_url == "memory://n"
    assert parse_location("mybucket") == Location("mybucket", "mybucket", "")
    assert parse_location("mybucket").where("k") == "mybucket/k"


def test_parse_location_local(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / "sub").mkdir(parents=True)
    # No marker yet: the deepest existing folder is the store.
    assert parse_location(f"{root}/sub/new/f") == Location(
        f"{root}/sub/new/f", str(root / "sub"), "new/f"
    )
    assert parse_location(f"{root}//sub/f").store_url == str(root)
    assert parse_location(f"{root}//sub/f").key == "sub/f"
    assert parse_location(f"file://{root}//x").key == "x"
    (root / ".cssfs-tmp").mkdir()  # the folder store's own folder: the store root
    assert parse_location(f"{root}/sub/new/f") == Location(
        f"{root}/sub/new/f", str(root), "sub/new/f"
    )
    assert parse_location(f"{root}/sub/").key == "sub/"
    assert parse_location(str(root)).key == ""


def test_plan_uploads(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    (tmp_path / "b.txt").write_bytes(b"b")
    tree = tmp_path / "tree"
    (tree / "deep").mkdir(parents=True)
    (tree / "x").write_bytes(b"x")
    (tree / "deep" / "y").write_bytes(b"y")
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    folder = Location("s3://bk/docs/", "s3://bk", "docs/")
    named = Location("s3://bk/n.txt", "s3://bk", "n.txt")
    assert plan_uploads([a], named, False) == [Upload(a, "n.txt")]
    assert plan_uploads([a], folder, False) == [Upload(a, "docs/a.txt")]
    assert plan_uploads([a, b], named, False) == [
        Upload(a, "n.txt/a.txt"), Upload(b, "n.txt/b.txt")
    ]
    assert sorted(u.key for u in plan_uploads([str(tree)], folder, True)) == [
        "docs/tree/deep/y", "docs/tree/x"
    ]
    assert sorted(u.key for u in plan_uploads([str(tree)], named, True)) == [
        "n.txt/deep/y", "n.txt/x"
    ]
    with pytest.raises(cli.CliError, match="use -R"):
        plan_uploads([str(tree)], folder, False)
    with pytest.raises(cli.CliError, match="stdin"):
        plan_uploads(["-"], folder, False)
    with pytest.raises(FileNotFoundError):
        plan_uploads([str(tmp_path / "missing")], folder, False)
    with pytest.raises(cli.CliError, match="cssfs's own"):
        plan_uploads([a], Location("s3://bk/.cssfs-policy", "s3://bk", ".cssfs-policy"), False)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_tty_and_for_large_transfers() -> None:
    ticks = iter(range(1000))
    tty = _Tty()
    with Progress(10 << 20, "up", tty, clock=lambda: float(next(ticks))) as p:
        for _ in range(10):
            p.update(1 << 20)
    text = tty.getvalue()
    assert "up [" in text and "10.0 MiB/10.0 MiB" in text and text.endswith("\n")
    small = _Tty()
    with Progress(1 << 20, "small", small) as p:
        p.update(1 << 20)
    assert small.getvalue() == ""
    piped = io.StringIO()
    with Progress(100 << 20, "piped", piped) as p:
        p.update(100 << 20)
    assert piped.getvalue() == ""
    unknown = _Tty()
    with Progress(None, "stdin", unknown, clock=lambda: float(next(ticks))) as p:
        p.update(5 << 20)
    assert "stdin 5.0 MiB" in unknown.getvalue()


# -- the commands on a folder store ----------------------------------------------------------


def test_put_get_cat_ls_rm(people: dict[str, str], run: Run, env: Path, bucket: Path) -> None:
    src = env / "report.txt"
    src.write_bytes(CANARY * 3)
    os.chmod(src, 0o640)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    big = env / "big.bin"
    big.write_bytes(os.urandom(5 * 1024 * 1024 + 17))  # over 4 MiB: no bar when not a TTY
    ok(run("put", str(src), str(big), f"{bucket}/docs/"))
    assert (bucket / ".cssfs-tmp").is_dir() and (bucket / "docs" / "report.txt").is_file()
    assert CANARY not in (bucket / "docs" / "report.txt").read_bytes()

    assert ok(run("ls", str(bucket))).out == "docs/\n"
    assert ok(run("ls", f"{bucket}/docs")).out == "big.bin\nreport.txt\n"
    long = ok(run("ls", "-l", f"{bucket}/docs/")).out.splitlines()
    assert re.match(rf"-rw-r----- +{3 * len(CANARY)} .* you +yes +report.txt$", long[1])
    assert re.match(rf"-rw-r--r-- +{5 * 1024 * 1024 + 17} .* you +yes +big.bin$", long[0])

    assert ok(run("cat", f"{bucket}/docs/report.txt")).out == (CANARY * 3).decode()
    ok(run("get", f"{bucket}/docs/report.txt"))
    got = env / "report.txt"
    assert got.read_bytes() == CANARY * 3
    assert got.stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert got.stat().st_mode & 0o777 == 0o640
    out = env / "out"
    out.mkdir()
    ok(run("get", f"{bucket}/docs/big.bin", str(out)))
    assert (out / "big.bin").read_bytes() == big.read_bytes()
    assert sorted(os.listdir(out)) == ["big.bin"]  # no temp file left

    fails(run("rm", f"{bucket}/docs"), ExitCode.USAGE)  # a folder needs -r
    ok(run("rm", f"{bucket}/docs/report.txt"))
    fails(run("rm", f"{bucket}/docs/report.txt"), ExitCode.NOT_FOUND)
    fails(run("get", f"{bucket}/docs/report.txt", str(env / "gone")), ExitCode.NOT_FOUND)
    assert not (env / "gone").exists()
    ok(run("rm", "-r", f"{bucket}/docs"))
    assert ok(run("ls", str(bucket))).out == ""

    # A folder marker object ("empty/", as the mount and the S3 console make) is the folder.
    (bucket / "empty").mkdir()
    (bucket / "empty" / ".cssfs-dirobj").write_bytes(b"")
    assert ok(run("ls", str(bucket))).out == "empty/\n"
    assert ok(run("ls", "-l", f"{bucket}/empty")).out == ""
    ok(run("rm", "-r", f"{bucket}/empty/"))
    assert ok(run("ls", str(bucket))).out == ""


def test_put_from_stdin_and_get_to_stdout(
    people: dict[str, str], env: Path, bucket: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Stdin:
        buffer = io.BytesIO(CANARY * 1000)

    monkeypatch.setattr("sys.stdin", Stdin)
    ok(run("put", "-", f"{bucket}/piped.txt"))
    assert ok(run("get", f"{bucket}/piped.txt", "-")).out == (CANARY * 1000).decode()


def test_recursive_put(people: dict[str, str], env: Path, bucket: Path, run: Run) -> None:
    tree = env / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "top.txt").write_bytes(b"top")
    (tree / "a" / "b" / "leaf.txt").write_bytes(b"leaf")
    fails(run("put", str(tree), f"{bucket}/"), ExitCode.USAGE)
    ok(run("put", "-R", str(tree), f"{bucket}/"))
    assert ok(run("ls", f"{bucket}/tree")).out == "a/\ntop.txt\n"
    assert ok(run("cat", f"{bucket}/tree/a/b/leaf.txt", f"{bucket}/tree/top.txt")).out == "leaftop"


def test_sharing_and_writers_in_ls(
    people: dict[str, str], env: Path, bucket: Path, run: Run
) -> None:
    (env / "f").write_bytes(CANARY)
    ok(run("put", "-r", "alice", str(env / "f"), f"{bucket}/for-alice"))
    ok(run("put", str(env / "f"), f"{bucket}/mine"))
    ok(run("-i", str(env / "eve.id"), "put", str(env / "f"), f"{bucket}/from-eve"))
    ok(run("-i", str(env / "eve.id"), "put", "-r", people["me"], str(env / "f"),
           f"{bucket}/eve-to-me"))
    (bucket / "plain.txt").write_bytes(b"not encrypted")

    # alice can read what was shared with her, not what was not.
    assert ok(run("-i", str(env / "alice.id"), "cat", f"{bucket}/for-alice")).out == \
        CANARY.decode()
    fails(run("-i", str(env / "alice.id"), "cat", f"{bucket}/mine"),
          ExitCode.NO_MATCHING_IDENTITY)

    lines = {line.split()[-1]: line for line in ok(run("ls", "-l", str(bucket))).out.splitlines()}
    assert re.search(r" you +yes +for-alice$", lines["for-alice"])
    assert re.search(r" ed25519:[0-9a-f-]+ +no +from-eve$", lines["from-eve"])
    assert re.search(r" ed25519:[0-9a-f-]+ +yes +eve-to-me$", lines["eve-to-me"])
    assert re.search(r" - +foreign +plain.txt$", lines["plain.txt"])
    # Once eve is a contact, her files carry her name.
    ok(run("contacts", "add", "eve", people["eve"]))
    lines = {line.split()[-1]: line for line in ok(run("ls", "-l", str(bucket))).out.splitlines()}
    assert re.search(r" eve +no +from-eve$", lines["from-eve"])
    fails(run("get", f"{bucket}/plain.txt", str(env / "p")), ExitCode.BAD_INPUT)
    assert not (env / "p").exists()


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("flip-chunk", ExitCode.PAYLOAD),
        ("truncate", ExitCode.PAYLOAD),
        ("append", ExitCode.PAYLOAD),
        ("header", ExitCode.HEADER_AUTH),
        ("swap", ExitCode.HEADER_AUTH),
    ],
)
def test_get_of_a_damaged_object_leaves_nothing(
    people: dict[str, str], env: Path, bucket: Path, run: Run, damage: str, code: ExitCode
) -> None:
    data = CANARY * (3 * CHUNK_SIZE // len(CANARY))
    (env / "f").write_bytes(data)
    (env / "g").write_bytes(data[:100])
    ok(run("put", str(env / "f"), str(env / "g"), f"{bucket}/d/"))
    obj = bucket / "d" / "f"
    blob = bytearray(obj.read_bytes())
    if damage == "flip-chunk":
        off, _ = chunk_range(2, len(data))
        blob[off + 9] ^= 1
    elif damage == "truncate":
        off, _ = chunk_range(2, len(data))
        del blob[off : off + 1]  # one byte short: the size no longer matches the header
        blob = blob[: len(blob) - 47]  # ... and is still a possible envelope size
    elif damage == "append":
        blob += b"\0" * 48
    elif damage == "header":
        blob[60] ^= 1
    else:
        blob = bytearray((bucket / "d" / "g").read_bytes())
    obj.write_bytes(bytes(blob))
    dest = env / "restored"
    result = fails(run("get", f"{bucket}/d/f", str(dest)), code)
    assert "d/f" in result.err
    assert not dest.exists()
    assert sorted(os.listdir(env)) == ["alice.id", "eve.id", "f", "g"]  # no temp file either


def test_errors_are_one_line(people: dict[str, str], env: Path, bucket: Path, run: Run) -> None:
    fails(run("get", f"{bucket}/nothing-here"), ExitCode.NOT_FOUND)
    fails(run("get", f"{bucket}/"), ExitCode.USAGE)
    fails(run("put", str(env / "missing"), f"{bucket}/x"), ExitCode.IO)
    fails(run("ls", f"{bucket}/nope"), ExitCode.NOT_FOUND)
    fails(run("ls", "--endpoint-url", "http://127.0.0.1:9", str(bucket)), ExitCode.CONFIG)
    fails(run("ls", "ftp://x/y"), ExitCode.CONFIG)
    fails(run("put", "-r", "nobody", str(env / "alice.id"), f"{bucket}/x"), ExitCode.CONFIG)
    fails(run("get", f"{bucket}/x", str(env / "no" / "such" / "dir" / "f")), ExitCode.IO)
    ok(run("put", str(env / "alice.id"), f"{bucket}/a"))
    fails(run("-i", str(env / "nobody.id"), "get", f"{bucket}/a"), ExitCode.CONFIG)


def test_memory_store_url(people: dict[str, str], env: Path, run: Run) -> None:
    (env / "m").write_bytes(CANARY)
    ok(run("put", str(env / "m"), "memory://cmdstore-test/dir/"))
    assert ok(run("ls", "memory://cmdstore-test/dir")).out == "m\n"
    assert ok(run("cat", "memory://cmdstore-test/dir/m")).out == CANARY.decode()
    ok(run("rm", "-r", "memory://cmdstore-test/"))
    assert ok(run("ls", "memory://cmdstore-test")).out == ""


def test_put_follows_the_folder_policy(
    people: dict[str, str], env: Path, bucket: Path, run: Run
) -> None:
    """A file put into a folder shared with `cssfs share` is encrypted for its people too, as
    the mount would; cssfs's own policy object is hidden from ls (shown with -a)."""
    (env / "f").write_bytes(CANARY)
    ok(run("put", str(env / "f"), f"{bucket}/team/first"))
    ok(run("share", "--store", str(bucket), "team", "alice"))
    ok(run("put", str(env / "f"), f"{bucket}/team/second"))
    ok(run("put", str(env / "f"), f"{bucket}/private"))
    alice = str(env / "alice.id")
    for name in ("team/first", "team/second"):
        assert ok(run("-i", alice, "cat", f"{bucket}/{name}")).out == CANARY.decode()
    fails(run("-i", alice, "cat", f"{bucket}/private"), ExitCode.NO_MATCHING_IDENTITY)
    assert ok(run("ls", f"{bucket}/team")).out == "first\nsecond\n"
    assert ".cssfs-policy" in ok(run("ls", "-a", f"{bucket}/team")).out
    fails(run("put", str(env / "f"), f"{bucket}/team/.cssfs-policy"), ExitCode.USAGE)
