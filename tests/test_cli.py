"""The offline command line: keys, contacts, encrypt/decrypt/inspect, exit codes and messages.

Commands run in-process through ``cli.main`` (capsys captures stdout/stderr); stdin/stdout
piping and import hygiene run ``python -m cssfs`` in a subprocess. Every failure must be one
``cssfs: error:`` line on stderr with its own exit code, leave no partial output, and never
echo the plaintext (CANARY) or a passphrase.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cssfs import cli, envelope
from cssfs.cli import ExitCode
from tests.support.clirun import Result, Run, ok

CANARY = b"CANARY-plaintext-7f3a9c: the quick brown fox\n"
PASSPHRASE = "pass-CANARY-5d1e"
REPO = Path(__file__).resolve().parent.parent


def fails(result: Result, code: ExitCode, *fragments: str) -> Result:
    """One error line on stderr, the expected code, and the message fragments."""
    assert result.code == code, result
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("cssfs: error: ")
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0]
    return result


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def keygen(run: Run, path: str | None = None, *extra: str) -> str:
    """Make an identity (at ``path``, default the standard one); return its recipient string."""
    argv = ["keygen", *extra] if path is None else ["-i", path, "keygen", *extra]
    result = ok(run(*argv))
    recipient, fingerprint = result.out.splitlines()
    assert recipient.startswith("cssfs1")
    assert fingerprint.startswith("fingerprint: ")
    return recipient


# -- keys -------------------------------------------------------------------------------------


def test_keygen_writes_a_private_identity_once(run: Run, env: Path) -> None:
    recipient = keygen(run)
    identity = env.parent / "home" / ".config" / "cssfs" / "identity"
    assert mode_of(identity) == 0o600
    assert mode_of(identity.parent) == 0o700
    before = identity.read_bytes()

    fails(run("keygen"), ExitCode.CONFIG, str(identity), "--force")
    assert identity.read_bytes() == before

    replaced = keygen(run, None, "--force")
    assert replaced != recipient
    assert identity.read_bytes() != before
    assert sorted(os.listdir(identity.parent)) == ["identity"]  # no temp files


def test_keygen_output_option_and_whoami(run: Run, env: Path) -> None:
    recipient = keygen(run, None, "-o", "mine.id")
    assert mode_of(env / "mine.id") == 0o600
    out = ok(run("-i", "mine.id", "whoami")).out.splitlines()
    assert out[0] == recipient
    assert out[1].startswith("fingerprint: ")
    # Global options work after the command too.
    assert ok(run("whoami", "-i", "mine.id")).out.splitlines()[0] == recipient
    assert ok(run("export", "--identity", "mine.id")).out == recipient + "\n"


def test_whoami_without_identity_says_how_to_make_one(run: Run, env: Path) -> None:
    fails(run("whoami"), ExitCode.CONFIG, "no identity at", "cssfs keygen")


def test_passphrase_protected_identity(
    run: Run, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pw = env / "pw"
    pw.write_text(PASSPHRASE + "\n")
    recipient = keygen(run, "p.id", "--passphrase-file", str(pw))
    assert PASSPHRASE.encode() not in (env / "p.id").read_bytes()

    # Not a terminal and no passphrase source: a clear error, not a prompt.
    fails(run("-i", "p.id", "whoami"), ExitCode.CONFIG, "passphrase-protected",
          "--passphrase-file")
    assert ok(run("-i", "p.id", "--passphrase-file", str(pw), "whoami")).out.startswith(
        recipient
    )

    wrong = env / "wrong"
    wrong.write_text("not it\n")
    fails(run("-i", "p.id", "--passphrase-file", str(wrong), "whoami"), ExitCode.PASSPHRASE,
          "passphrase")

    # systemd's LoadCredential= directory.
    creds = env / "creds"
    creds.mkdir()
    (creds / "cssfs-passphrase").write_text(PASSPHRASE)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert ok(run("-i", "p.id", "whoami")).out.startswith(recipient)


def test_keygen_passphrase_from_environment(
    run: Run, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pw = env / "pw"
    pw.write_text(PASSPHRASE + "\n")
    monkeypatch.setenv("CSSFS_PASSPHRASE_FILE", str(pw))
    recipient = keygen(run, "p.id")
    monkeypatch.delenv("CSSFS_PASSPHRASE_FILE")
    fails(run("-i", "p.id", "whoami"), ExitCode.CONFIG, "passphrase-protected")
    monkeypatch.setenv("CSSFS_PASSPHRASE_FILE", str(pw))
    assert ok(run("-i", "p.id", "whoami")).out.startswith(recipient)
    # --no-passphrase wins over the environment.
    keygen(run, "open.id", "--no-passphrase")
    monkeypatch.delenv("CSSFS_PASSPHRASE_FILE")
    ok(run("-i", "open.id", "whoami"))


def test_passphrase_is_never_an_argument(run: Run, env: Path) -> None:
    # Nor may an abbreviation stand for --passphrase-file.
    assert run("keygen", "--passphrase", "x").code == ExitCode.USAGE
    assert run("--passphrase", "x", "keygen").code == ExitCode.USAGE
    assert run("keygen", "--no-pass").code == ExitCode.USAGE
    assert not (env.parent / "home" / ".config" / "cssfs" / "identity").exists()


def test_export_import_pem_round_trip(run: Run, env: Path) -> None:
    keygen(run)
    env.joinpath("CANARY.txt").write_bytes(CANARY)
    ok(run("encrypt", "CANARY.txt", "c.enc"))

    out = ok(run("export", "--pem", "-d", "keys")).out
    private = env / "keys" / "recipient_private_key.pem"
    public = env / "keys" / "recipient_public_key.pem"
    assert out == f"wrote {Path('keys', private.name)}\nwrote {Path('keys', public.name)}\n"
    assert mode_of(private) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    fails(run("export", "--pem", "-d", "keys"), ExitCode.CONFIG, "exists already")
    ok(run("export", "--pem", "-d", "keys", "--force"))

    result = ok(run("-i", "imported.id", "import", "--pem", str(private)))
    assert "new Ed25519 signing key" in result.out
    assert mode_of(env / "imported.id") == 0o600
    fails(run("-i", "imported.id", "import", "--pem", str(private)), ExitCode.CONFIG,
          "exists already")
    # Same X25519 key: the imported identity opens what was encrypted for the original.
    ok(run("-i", "imported.id", "decrypt", "c.enc", "c.out"))
    assert (env / "c.out").read_bytes() == CANARY


def _write_pem_pair(directory: Path) -> tuple[Path, Path]:
    """The original workflow's key files, made with `cryptography` directly."""
    key = X25519PrivateKey.generate()
    private = directory / "recipient_private_key.pem"
    public = directory / "recipient_public_key.pem"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return private, public


def test_original_workflow_pem_keys(run: Run, env: Path) -> None:
    keygen(run)
    private, public = _write_pem_pair(env)
    env.joinpath("sample.txt").write_bytes(CANARY)
    ok(run("encrypt", "-r", str(public), "sample.txt", "sample.txt.enc"))
    ok(run("-i", "receiver.id", "import", "--pem", str(private)))
    ok(run("-i", "receiver.id", "decrypt", "sample.txt.enc", "sample.out"))
    assert (env / "sample.out").read_bytes() == CANARY


def test_ec_p256_pem_is_rejected(run: Run, env: Path) -> None:
    key = generate_private_key(SECP256R1())
    env.joinpath("ec.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    env.joinpath("ec_pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    fails(run("-i", "x.id", "import", "--pem", "ec.pem"), ExitCode.KEY_FORMAT, "ec.pem",
          "X25519")
    assert not (env / "x.id").exists()
    keygen(run)
    env.joinpath("sample.txt").write_bytes(CANARY)
    fails(run("encrypt", "-r", "ec_pub.pem", "sample.txt", "out.enc"), ExitCode.KEY_FORMAT,
          "ec_pub.pem", "X25519")
    assert sorted(os.listdir(env)) == ["ec.pem", "ec_pub.pem", "sample.txt"]


# -- contacts ---------------------------------------------------------------------------------


def test_contacts_add_list_rm(run: Run, env: Path) -> None:
    alice = keygen(run, "alice.id")
    bob = keygen(run, "bob.id")
    _, public = _write_pem_pair(env)
    assert ok(run("contacts", "list")).out == ""
    assert ok(run("contacts", "add", "alice", alice)).out.startswith("alice  ")
    env.joinpath("bob.txt").write_text(bob + "\n")
    ok(run("contacts", "add", "bob", "bob.txt"))
    ok(run("contacts", "add", "legacy", str(public)))

    rows = [line.split() for line in ok(run("contacts", "list")).out.splitlines()]
    assert [row[0] for row in rows] == ["alice", "bob", "legacy"]
    assert rows[0][2] == alice and rows[1][2] == bob
    assert rows[2][2].startswith("x25519:")
    whoami = ok(run("-i", "alice.id", "whoami")).out.splitlines()[1]
    assert whoami == f"fingerprint: {rows[0][1]}"

    fails(run("contacts", "add", "alice", bob), ExitCode.CONFIG, "exists already")
    fails(run("contacts", "add", "bad/name", bob), ExitCode.CONFIG, "contact name")
    fails(run("contacts", "add", "carol", "cssfs1garbage"), ExitCode.KEY_FORMAT)
    fails(run("contacts", "add", "carol", "no-such-file"), ExitCode.CONFIG, "no-such-file")
    ok(run("contacts", "rm", "bob"))
    fails(run("contacts", "rm", "bob"), ExitCode.CONFIG, "no contact named 'bob'")
    assert [line.split()[0] for line in ok(run("contacts", "list")).out.splitlines()] == [
        "alice", "legacy"
    ]


def test_broken_contacts_file_is_a_config_error(run: Run, env: Path) -> None:
    keygen(run)
    contacts = env.parent / "home" / ".config" / "cssfs" / "contacts"
    contacts.write_text("alice not-a-recipient\n")
    fails(run("contacts", "list"), ExitCode.CONFIG, f"{contacts}:1")


# -- encrypt / decrypt ------------------------------------------------------------------------


@pytest.fixture
def people(run: Run, env: Path) -> dict[str, str]:
    """Three identities (me = the default one, alice, bob), contacts, and CANARY encrypted by
    me for alice and bob (by name and by string) into ``shared.enc``."""
    recipients = {"me": keygen(run), "alice": keygen(run, "alice.id"),
                  "bob": keygen(run, "bob.id"), "carol": keygen(run, "carol.id")}
    ok(run("contacts", "add", "alice", recipients["alice"]))
    env.joinpath("plain.txt").write_bytes(CANARY * 3000)  # > 2 chunks
    ok(run("encrypt", "-r", "alice", "-r", recipients["bob"], "plain.txt", "shared.enc"))
    return recipients


def test_each_recipient_decrypts(run: Run, env: Path, people: dict[str, str]) -> None:
    plain = (env / "plain.txt").read_bytes()
    for who, identity in (("me", []), ("alice", ["-i", "alice.id"]), ("bob", ["-i", "bob.id"])):
        ok(run(*identity, "decrypt", "shared.enc", f"{who}.out"))
        assert (env / f"{who}.out").read_bytes() == plain
        assert mode_of(env / f"{who}.out") == 0o600


def test_a_third_party_gets_no_matching_identity(
    run: Run, env: Path, people: dict[str, str]
) -> None:
    before = sorted(os.listdir(env))
    fails(run("-i", "carol.id", "decrypt", "shared.enc", "carol.out"),
          ExitCode.NO_MATCHING_IDENTITY, "shared.enc", "not encrypted for")
    assert sorted(os.listdir(env)) == before


def test_encrypt_errors(run: Run, env: Path, people: dict[str, str]) -> None:
    before = sorted(os.listdir(env))
    fails(run("encrypt", "-r", "dave", "plain.txt", "x.enc"), ExitCode.CONFIG,
          "unknown recipient 'dave'")
    fails(run("encrypt", "missing.txt", "x.enc"), ExitCode.IO, "missing.txt",
          "No such file")
    fails(run("encrypt", "plain.txt", "no/such/dir/x.enc"), ExitCode.IO, "no/such/dir")
    fails(run("-i", "nobody.id", "encrypt", "plain.txt", "x.enc"), ExitCode.CONFIG,
          "nobody.id")
    assert sorted(os.listdir(env)) == before


def test_output_is_replaced_atomically(run: Run, env: Path, people: dict[str, str]) -> None:
    env.joinpath("out.txt").write_bytes(b"old contents\n")
    fails(run("-i", "carol.id", "decrypt", "shared.enc", "out.txt"),
          ExitCode.NO_MATCHING_IDENTITY)
    assert (env / "out.txt").read_bytes() == b"old contents\n"
    ok(run("decrypt", "shared.enc", "out.txt"))
    assert (env / "out.txt").read_bytes() == (env / "plain.txt").read_bytes()


def _header_offset_of_signature(data: bytes) -> int:
    header = envelope.parse_header(data[: envelope.HEADER_SIZE])
    return envelope.STANZAS_OFFSET + envelope.STANZA_SIZE * len(header.stanzas) + 32


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("case", "code", "fragment"),
    [
        ("payload byte flipped", ExitCode.PAYLOAD, "chunk 1"),
        ("last chunk dropped", ExitCode.PAYLOAD, "truncated"),
        ("cut mid-chunk", ExitCode.PAYLOAD, "truncated"),
        ("trailing data", ExitCode.PAYLOAD, "trailing"),
        ("header only", ExitCode.PAYLOAD, "truncated"),
        ("mtime in header flipped", ExitCode.HEADER_AUTH, "header"),
        ("signature flipped", ExitCode.SIGNATURE, "signature"),
        ("unknown version", ExitCode.UNSUPPORTED_VERSION, "version"),
        ("not an envelope", ExitCode.BAD_INPUT, "not a cssfs envelope"),
        ("short file", ExitCode.BAD_INPUT, "too short"),
        ("empty file", ExitCode.BAD_INPUT, "too short"),
    ],
)
def test_bad_envelopes(
    run: Run, env: Path, people: dict[str, str], case: str, code: ExitCode, fragment: str
) -> None:
    data = (env / "shared.enc").read_bytes()
    size = envelope.plain_size(len(data))
    bad = {
        "payload byte flipped": lambda: _flip(data, envelope.chunk_range(1, size)[0] + 5),
        "last chunk dropped": lambda: data[: envelope.chunk_range(2, size)[0]],
        "cut mid-chunk": lambda: data[: envelope.chunk_range(1, size)[0] + 100],
        "trailing data": lambda: data + b"\x00",
        "header only": lambda: data[: envelope.HEADER_SIZE],
        "mtime in header flipped": lambda: _flip(data, 16),
        "signature flipped": lambda: _flip(data, _header_offset_of_signature(data)),
        "unknown version": lambda: data[:6] + b"\x09" + data[7:],
        "not an envelope": lambda: CANARY * 200,
        "short file": lambda: CANARY,
        "empty file": lambda: b"",
    }[case]()
    env.joinpath("bad.enc").write_bytes(bad)
    before = sorted(os.listdir(env))
    fails(run("decrypt", "bad.enc", "bad.out"), code, "bad.enc", fragment)
    assert sorted(os.listdir(env)) == before  # neither bad.out nor a temp file


def test_every_error_class_has_its_own_exit_code() -> None:
    # A new error class must be given a code on purpose, not fall through to ERROR (a bug).
    import cssfs.errors

    classes = [
        cls for cls in vars(cssfs.errors).values()
        if isinstance(cls, type) and issubclass(cls, cssfs.errors.CssfsError)
        and cls is not cssfs.errors.CssfsError
    ]
    for cls in classes:
        assert cli.exit_code_for(cls.__new__(cls)) != ExitCode.ERROR, cls
    assert len({int(code) for code in ExitCode}) == len(ExitCode.__members__)  # no aliases
    assert ExitCode.INTERRUPTED == 130 and ExitCode.USAGE == 2


def test_usage_errors(run: Run, env: Path) -> None:
    assert run().code == ExitCode.USAGE
    assert run("frobnicate").code == ExitCode.USAGE
    assert run("decrypt", "a", "b", "c").code == ExitCode.USAGE
    result = run("--help")
    assert result.code == ExitCode.OK and "keygen" in result.out and result.err == ""
    assert run("--version").out.startswith("cssfs ")


def test_interrupt_exits_130_and_leaves_no_output(
    run: Run, env: Path, people: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class InterruptedStdin:
        """Stands in for a terminal where the user presses Ctrl-C while cssfs reads."""

        def readinto(self, buffer: memoryview) -> int:
            raise KeyboardInterrupt

    class Stdin:
        buffer = InterruptedStdin()

    monkeypatch.setattr(sys, "stdin", Stdin())
    result = run("encrypt", "-", "out.enc")
    assert result.code == ExitCode.INTERRUPTED == 130
    assert result.err == "cssfs: error: interrupted\n"
    assert not [name for name in os.listdir(env) if name.startswith("out.enc")]


# -- inspect ----------------------------------------------------------------------------------


def _fields(out: str) -> dict[str, str]:
    rows = [line.split(":", 1) for line in out.splitlines()]
    assert len({len(key) + len(value) - len(value.lstrip()) for key, value in rows}) == 1, out
    return {key: value.strip() for key, value in rows}


def test_inspect(run: Run, env: Path, people: dict[str, str]) -> None:
    size = (env / "plain.txt").stat().st_size
    mine = _fields(ok(run("inspect", "shared.enc")).out)
    assert mine["format"].startswith("cssfs envelope v1")
    assert mine["size"] == f"{size} bytes"
    assert mine["envelope"] == f"{envelope.envelope_size(size)} bytes"
    assert mine["recipients"] == "3: you, alice, 1 unknown"
    assert mine["writer"].endswith("(you)")
    assert mine["signature"] == "valid"
    assert mine["decryptable"] == "yes"

    ok(run("-i", "bob.id", "contacts", "add", "me", people["me"]))
    bobs = _fields(ok(run("-i", "bob.id", "inspect", "shared.enc")).out)
    assert bobs["decryptable"] == "yes"
    assert bobs["writer"].endswith("(me)")
    assert bobs["writer"].split()[0] == mine["writer"].split()[0]

    carols = _fields(ok(run("-i", "carol.id", "inspect", "shared.enc")).out)
    assert carols["decryptable"] == "no (not encrypted for you)"
    assert carols["signature"] == "valid"


def test_inspect_reports_and_fails_on_tampering(
    run: Run, env: Path, people: dict[str, str]
) -> None:
    data = (env / "shared.enc").read_bytes()
    env.joinpath("sig.enc").write_bytes(_flip(data, _header_offset_of_signature(data)))
    result = fails(run("inspect", "sig.enc"), ExitCode.SIGNATURE, "sig.enc")
    assert _fields(result.out)["signature"] == "INVALID"

    env.joinpath("cut.enc").write_bytes(data[:-1])
    result = fails(run("inspect", "cut.enc"), ExitCode.PAYLOAD, "truncated")
    assert "does not match" in _fields(result.out)["size"]

    env.joinpath("mtime.enc").write_bytes(_flip(data, 16))
    result = fails(run("inspect", "mtime.enc"), ExitCode.HEADER_AUTH, "mtime.enc")
    assert _fields(result.out)["decryptable"].startswith("no (")

    # Several problems: the first check decrypt would make decides the exit status.
    env.joinpath("both.enc").write_bytes(_flip(data, 16)[:-1])
    result = fails(run("inspect", "both.enc"), ExitCode.HEADER_AUTH, "both.enc")
    assert "does not match" in _fields(result.out)["size"]

    env.joinpath("junk").write_bytes(CANARY * 200)
    result = fails(run("inspect", "junk"), ExitCode.BAD_INPUT, "junk", "not a cssfs envelope")
    assert result.out == ""


def test_inspect_without_identity(run: Run, env: Path, people: dict[str, str]) -> None:
    (env.parent / "home" / ".config" / "cssfs" / "identity").unlink()
    fields = _fields(ok(run("inspect", "shared.enc")).out)
    assert fields["decryptable"] == "unknown (no identity)"
    assert fields["recipients"] == "3: alice, 2 unknown"
    assert fields["writer"].startswith("ed25519:")


# -- subprocesses: pipes, imports, logging ----------------------------------------------------


def cssfs(*argv: str, stdin: bytes = b"", env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cssfs", *argv], input=stdin, capture_output=True,
        env=env, cwd=os.getcwd(), timeout=60, check=False,
    )


def test_stdin_stdout_pipes(run: Run, env: Path, people: dict[str, str]) -> None:
    plain = (env / "plain.txt").read_bytes()
    enc = cssfs("encrypt", "-r", "alice", stdin=plain)
    assert enc.returncode == 0 and enc.stderr == b""
    assert len(enc.stdout) == envelope.envelope_size(len(plain))

    dec = cssfs("-i", "alice.id", "decrypt", stdin=enc.stdout)
    assert dec.returncode == 0 and dec.stderr == b""
    assert dec.stdout == plain

    # '-' names stdin/stdout explicitly; the output of a file-to-stdout run matches too.
    dec = cssfs("decrypt", "shared.enc", "-")
    assert (dec.returncode, dec.stderr, dec.stdout) == (0, b"", plain)

    tampered = _flip(enc.stdout, len(enc.stdout) - 10)  # in the chunk table, after the payload
    dec = cssfs("-i", "alice.id", "decrypt", "-", "-", stdin=tampered)
    assert dec.returncode == ExitCode.PAYLOAD
    assert dec.stderr.decode().startswith("cssfs: error: <stdin>: ")
    assert len(dec.stderr.decode().splitlines()) == 1
    assert CANARY not in dec.stderr


def test_cli_import_loads_no_fuse_and_no_trio() -> None:
    code = (
        "import sys, cssfs.cli; "
        "bad = {'pyfuse3', 'trio'} & set(sys.modules); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                            check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode()


def test_keygen_and_crypt_work_without_pyfuse3(tmp_path: Path) -> None:
    # pyfuse3 missing (or libfuse unloadable): an import of it fails. Key and file commands
    # must still work.
    code = (
        "import sys; sys.modules['pyfuse3'] = None; "
        "from cssfs.cli import main; "
        "rc = main(['-i', 'a.id', 'keygen']); assert rc == 0, rc; "
        "open('p', 'wb').write(b'x' * 100); "
        "rc = main(['-i', 'a.id', 'encrypt', 'p', 'p.enc']); assert rc == 0, rc; "
        "rc = main(['-i', 'a.id', 'decrypt', 'p.enc', 'p.out']); assert rc == 0, rc; "
        "rc = main(['--help']); assert rc == 0, rc"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                            check=False, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr.decode()
    assert (tmp_path / "p.out").read_bytes() == b"x" * 100


def test_debug_logging_and_journal_format(env: Path) -> None:
    plain = cssfs("--debug", "decrypt", "missing.enc")
    assert plain.returncode == ExitCode.IO
    lines = plain.stderr.decode().splitlines()
    assert lines[-1] == "cssfs: error: missing.enc: No such file or directory"
    assert any(" DEBUG cssfs.cli: decrypt failed" in line for line in lines)
    assert "Traceback" in plain.stderr.decode()  # --debug shows it

    quiet = cssfs("decrypt", "missing.enc")
    assert quiet.stderr == b"cssfs: error: missing.enc: No such file or directory\n"

    # Under systemd (JOURNAL_STREAM names our stderr): no timestamps, syslog priorities.
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cssfs", "--debug-module", "cssfs.cli", "decrypt",
             "missing.enc"],
            stderr=write_end, stdout=subprocess.DEVNULL, timeout=60, check=False,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        journal = f.read().decode().splitlines()
    assert proc.returncode == ExitCode.IO
    assert journal[0] == "<7>cssfs.cli: decrypt failed"


# -- start-up: a command imports only its own module ------------------------------------------


def _registered(name: str) -> set[str]:
    """The command names (aliases included) module ``name`` registers."""
    import argparse

    parser = cli.build_parser([name])
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def test_command_table_matches_the_modules() -> None:
    # COMMANDS is a start-up shortcut; it must name, for every command, the module that
    # really registers it, and every module's commands must be in it.
    seen: dict[str, str] = {}
    for name in cli.command_module_names():
        for command in _registered(name):
            assert command not in seen, (command, name, seen.get(command))
            seen[command] = name
    assert seen == cli.COMMANDS


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["get", "s3://b/k"], "get"),
        (["-i", "put", "get"], "get"),  # -i takes the next argument as its value
        (["--identity=x", "--debug", "decrypt", "a"], "decrypt"),
        (["-ix", "--passphrase-file", "p", "--debug-module", "botocore", "ls", "b"], "ls"),
        (["--help"], None),
        (["-h", "put"], None),
        (["--version"], None),
        (["--bogus", "put"], None),
        ([], None),
    ],
)
def test_command_of(argv: list[str], command: str | None) -> None:
    assert cli.command_of(argv) == command


def test_a_command_imports_only_its_module(run: Run, env: Path) -> None:
    code = (
        "import sys; from cssfs.cli import main; "
        "rc = main(sys.argv[1:]); "
        "loaded = sorted(m for m in sys.modules if m.startswith('cssfs.cmd_')); "
        "print(rc, ' '.join(loaded))"
    )

    def loaded(*argv: str) -> str:
        result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                                timeout=60, check=False, cwd=env,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        return result.stdout.decode().strip().splitlines()[-1]

    assert loaded("--version") == "0"
    assert loaded("-i", "x.id", "whoami") == "22 cssfs.cmd_keys"
    assert loaded("get", "--help") == "0 cssfs.cmd_store"
    everything = loaded("--help").split()
    assert everything[0] == "0"
    assert {f"cssfs.{name}" for name in set(cli.COMMANDS.values())} <= set(everything[1:])
    # A typo still gets argparse's usage error from the full parser.
    result = run("gte", "s3://b/k")
    assert result.code == ExitCode.USAGE and "invalid choice: 'gte'" in result.err
