"""config: XDG paths, passphrase sources, identity loading, atomic files, the contacts book."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cssfs import config
from cssfs.errors import ConfigError, KeyFormatError, PassphraseError
from cssfs.keys import Identity, Recipient


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (
        "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR",
        "CSSFS_IDENTITY", "CSSFS_PASSPHRASE_FILE", "CREDENTIALS_DIRECTORY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return home


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- paths ------------------------------------------------------------------------------------


def test_xdg_defaults_are_under_home(clean_env: Path) -> None:
    assert config.config_dir() == clean_env / ".config" / "cssfs"
    assert config.state_dir() == clean_env / ".local" / "state" / "cssfs"
    assert config.cache_dir() == clean_env / ".cache" / "cssfs"
    assert config.runtime_dir() == clean_env / ".local" / "state" / "cssfs" / "run"
    assert config.identity_path() == clean_env / ".config" / "cssfs" / "identity"
    assert config.contacts_path() == clean_env / ".config" / "cssfs" / "contacts"


def test_xdg_variables_are_used_and_relative_ones_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_env: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid per the XDG spec
    assert config.config_dir() == tmp_path / "c" / "cssfs"
    assert config.state_dir() == tmp_path / "s" / "cssfs"
    assert config.runtime_dir() == tmp_path / "r" / "cssfs"
    assert config.cache_dir() == clean_env / ".cache" / "cssfs"


def test_identity_path_precedence(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    assert config.identity_path(None) == config.default_identity_path()
    monkeypatch.setenv("CSSFS_IDENTITY", "/env/identity")
    assert config.identity_path(None) == Path("/env/identity")
    assert config.identity_path("given") == Path("given")


# -- passphrases ------------------------------------------------------------------------------


def test_passphrase_file_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert config.passphrase_file(None) is None
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert config.passphrase_file(None) is None  # the credential is not there
    (creds / "cssfs-passphrase").write_bytes(b"from systemd\n")
    assert config.passphrase_file(None) == creds / "cssfs-passphrase"
    monkeypatch.setenv("CSSFS_PASSPHRASE_FILE", "/env/pass")
    assert config.passphrase_file(None) == Path("/env/pass")
    assert config.passphrase_file("given") == Path("given")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"secret\n", b"secret"),
        (b"secret", b"secret"),
        (b"secret\r\n", b"secret"),
        (b" spaced out \n", b" spaced out "),
    ],
)
def test_read_passphrase_file(tmp_path: Path, content: bytes, expected: bytes) -> None:
    path = tmp_path / "pw"
    path.write_bytes(content)
    assert config.read_passphrase_file(path) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"\n", "empty"), (b"one\ntwo\n", "more than one line")],
)
def test_read_passphrase_file_rejects(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "pw"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        config.read_passphrase_file(path)


def test_passphrase_source_is_lazy_and_explains_itself(tmp_path: Path) -> None:
    identity = tmp_path / "identity"
    get = config.passphrase_source(identity, None)  # stdin is not a terminal under pytest
    with pytest.raises(ConfigError, match="--passphrase-file") as info:
        get()
    assert str(identity) in str(info.value)
    pw = tmp_path / "pw"
    pw.write_bytes(b"hunter2\n")
    get = config.passphrase_source(identity, pw)
    pw.unlink()
    with pytest.raises(FileNotFoundError):  # nothing is read before it is needed
        get()


def test_new_passphrase(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"correct horse\n")
    assert config.new_passphrase(pw, no_passphrase=False) == b"correct horse"
    assert config.new_passphrase(pw, no_passphrase=True) is None
    assert config.new_passphrase(None, no_passphrase=False) is None  # no terminal: unprotected


# -- files and identities ---------------------------------------------------------------------


def test_write_atomic_modes_and_no_clobber(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file"
    config.write_atomic(target, b"one", mode=0o600, overwrite=False)
    assert target.read_bytes() == b"one"
    assert mode_of(target) == 0o600
    assert mode_of(target.parent) == 0o700
    assert mode_of(target.parent.parent) == 0o700
    with pytest.raises(FileExistsError):
        config.write_atomic(target, b"two", overwrite=False)
    assert target.read_bytes() == b"one"
    config.write_atomic(target, b"three", mode=0o644)
    assert target.read_bytes() == b"three"
    assert mode_of(target) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["file"]  # no temp files left


def test_load_identity(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="cssfs keygen"):
        config.load_identity(missing, None)

    identity = Identity.generate()
    plain = tmp_path / "plain"
    plain.write_bytes(identity.to_file(None))
    assert config.load_identity(plain, None).recipient == identity.recipient

    protected = tmp_path / "protected"
    protected.write_bytes(identity.to_file(b"pw", scrypt_log_n=10))
    assert config.load_identity(protected, lambda: b"pw").recipient == identity.recipient
    with pytest.raises(PassphraseError):
        config.load_identity(protected, lambda: b"wrong")

    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"hello\n")
    with pytest.raises(KeyFormatError, match=str(garbage)):
        config.load_identity(garbage, None)


# -- contacts ---------------------------------------------------------------------------------


def test_contacts_round_trip_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "contacts"
    alice, bob = Identity.generate().recipient, Identity.generate().recipient
    book = config.Contacts.load(path)
    assert len(book) == 0
    book.add("alice", alice)
    book.save()
    assert mode_of(path) == 0o600
    # The user annotates the file by hand; a rewrite keeps the notes.
    path.write_text(path.read_text() + "\n# met at the conference\n")
    book = config.Contacts.load(path)
    book.add("bob.smith-2", bob)
    book.save()
    book = config.Contacts.load(path)
    assert [(c.name, c.recipient) for c in book] == [("alice", alice), ("bob.smith-2", bob)]
    assert "# met at the conference" in path.read_text()
    assert book.remove("alice").recipient == alice
    book.save()
    book = config.Contacts.load(path)
    assert [c.name for c in book] == ["bob.smith-2"]
    assert "alice" not in path.read_text()
    assert "# met at the conference" in path.read_text()


def test_contacts_lookups(tmp_path: Path) -> None:
    alice = Identity.generate().recipient
    book = config.Contacts.load(tmp_path / "contacts")
    book.add("alice", alice)
    assert book.get("alice") == config.Contact("alice", alice)
    assert book.get("bob") is None
    assert alice.ed25519 is not None
    assert book.name_for_signing_key(alice.ed25519) == "alice"
    assert book.name_for_signing_key(bytes(32)) is None
    assert book.name_for_key_id(alice.key_id) == "alice"
    assert book.name_for_key_id(bytes(8)) is None


@pytest.mark.parametrize("name", ["", "a b", "al/ice", "ali:ce", "ålice"])
def test_contacts_reject_bad_names(tmp_path: Path, name: str) -> None:
    book = config.Contacts.load(tmp_path / "contacts")
    with pytest.raises(ConfigError, match="contact name"):
        book.add(name, Identity.generate().recipient)


def test_contacts_reject_duplicates_and_unknown_names(tmp_path: Path) -> None:
    book = config.Contacts.load(tmp_path / "contacts")
    book.add("alice", Identity.generate().recipient)
    with pytest.raises(ConfigError, match="exists already"):
        book.add("alice", Identity.generate().recipient)
    with pytest.raises(ConfigError, match="no contact named 'bob'"):
        book.remove("bob")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice", "expected 'name recipient'"),
        ("alice cssfs1abc extra", "expected 'name recipient'"),
        ("al/ice {r}", "bad contact name"),
        ("alice cssfs1notarecipient", "recipient"),
        ("alice x25519:ABCD", "x25519"),
    ],
)
def test_contacts_file_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "contacts"
    path.write_text("# comment\n\n" + line.format(r=Identity.generate().recipient.to_string()))
    with pytest.raises(ConfigError, match=message) as info:
        config.Contacts.load(path)
    assert f"{path}:3:" in str(info.value)


def test_contacts_file_rejects_a_name_listed_twice(tmp_path: Path) -> None:
    path = tmp_path / "contacts"
    r = Identity.generate().recipient.to_string()
    path.write_text(f"alice {r}\nalice {r}\n")
    with pytest.raises(ConfigError, match=f"{path}:2: contact 'alice' is listed twice"):
        config.Contacts.load(path)


def test_pem_contact_has_no_signing_key(tmp_path: Path) -> None:
    x25519 = X25519PrivateKey.generate().public_key().public_bytes_raw()
    recipient = Recipient(x25519, None)
    assert config.recipient_field(recipient) == "x25519:" + x25519.hex()
    assert config.parse_recipient_field(config.recipient_field(recipient)) == recipient
    book = config.Contacts.load(tmp_path / "contacts")
    book.add("legacy", recipient)
    book.save()
    assert config.Contacts.load(tmp_path / "contacts").get("legacy") == config.Contact(
        "legacy", recipient
    )
    with pytest.raises(KeyFormatError):
        config.parse_recipient_field("x25519:" + x25519.hex().upper())


# -- recipients -------------------------------------------------------------------------------


def _pem_pair(directory: Path) -> tuple[Path, Path, bytes]:
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
    return private, public, key.public_key().public_bytes_raw()


def test_resolve_recipient_order(tmp_path: Path) -> None:
    alice = Identity.generate().recipient
    bob = Identity.generate().recipient
    book = config.Contacts.load(tmp_path / "contacts")
    book.add("alice", alice)
    # A file named like a contact: the contact wins.
    Path("alice").write_text(bob.to_string() + "\n")
    assert config.resolve_recipient("alice", book) == alice
    assert config.resolve_recipient(bob.to_string(), book) == bob
    Path("bob.txt").write_text(bob.to_string() + "\n")
    assert config.resolve_recipient("bob.txt", book) == bob
    _, public, raw = _pem_pair(tmp_path)
    assert config.resolve_recipient(str(public), book) == Recipient(raw, None)


def test_resolve_recipient_errors(tmp_path: Path) -> None:
    book = config.Contacts.load(tmp_path / "contacts")
    with pytest.raises(ConfigError, match="unknown recipient 'carol'"):
        config.resolve_recipient("carol", book)
    with pytest.raises(KeyFormatError):
        config.resolve_recipient("cssfs1tooshort", book)
    private, _, _ = _pem_pair(tmp_path)
    with pytest.raises(KeyFormatError, match="is a private key"):
        config.resolve_recipient(str(private), book)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xff\xfe not a key")
    with pytest.raises(KeyFormatError, match="neither a PEM public key"):
        config.resolve_recipient(str(junk), book)


def test_resolve_recipient_loads_the_default_book(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    alice = Identity.generate().recipient
    book = config.Contacts.load()
    book.add("alice", alice)
    book.save()
    assert config.contacts_path().exists()
    assert config.resolve_recipient("alice") == alice
    assert os.listdir(config.config_dir()) == ["contacts"]
