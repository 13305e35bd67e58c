"""Sharing through real mounts: Alice, Bob and Carol mount one moto bucket at once.

Carol is never a recipient. Alice shares a folder with Bob (``cssfs share``); Alice writes, Bob
reads with ``cat``/``cmp``; Bob writes, Alice reads and sees Bob as the writer; Carol lists the
files but gets EACCES and no plaintext. Forgeries by Bob (a payload replaced under Alice's header,
a file claiming Alice as writer) are refused by Alice's and Carol's mounts; a tampered policy is
not followed; after ``cssfs unshare`` Bob can open neither old nor new files.

One set of mounts serves every step (mounting is slow), as S3QL's t4_fuse does.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cssfs.crypto import PayloadCipher, derive_file_keys, hmac_sha256, sha256
from cssfs.envelope import (
    HEADER_SIZE,
    EnvelopeWriter,
    object_binding,
    open_header,
    parse_header,
)
from cssfs.keys import Identity
from cssfs.policy import parse_policy, policy_key, recipient_entry
from tests.support.mounting import fuse_test_marker, make_identity, mounted

pytestmark = [*fuse_test_marker(), pytest.mark.s3]

CANARY = b"CANARY-share-mount-7f3a: only Alice and Bob may ever see this\n"
FOLDER = "shared"


def _contacts(config_home: Path, people: dict[str, Identity]) -> None:
    """Write a contacts book (the mount re-reads it when it fetches policies)."""
    path = config_home / "cssfs" / "contacts"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n} {i.recipient.to_string()}\n" for n, i in people.items()))
    path.chmod(0o600)


@dataclasses.dataclass
class World:
    tmp: Path
    endpoint: str
    bucket: str
    env: dict[str, str]
    ids: dict[str, Identity]
    id_paths: dict[str, Path]
    mounts: dict[str, Any]

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    def path(self, who: str, *parts: str) -> Path:
        return self.mounts[who].path(FOLDER, *parts)

    def cli(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "XDG_CONFIG_HOME": os.fspath(self.tmp / f"cfg-{who}")}
        return subprocess.run(
            [sys.executable, "-m", "cssfs", "-i", os.fspath(self.id_paths[who]), *args],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )

    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def raw_get(self, key: str) -> bytes:
        body = self.s3().get_object(Bucket=self.bucket, Key=key)["Body"]
        return bytes(body.read())

    def raw_put(self, key: str, data: bytes) -> None:
        self.s3().put_object(Bucket=self.bucket, Key=key, Body=data)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> Iterator[World]:
    import boto3

    tmp = tmp_path_factory.mktemp("share-mount")
    bucket_name = f"t-share-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).create_bucket(Bucket=bucket_name)
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url}
    ids: dict[str, Identity] = {}
    id_paths: dict[str, Path] = {}
    for who in ("alice", "bob", "carol"):
        id_paths[who] = tmp / f"{who}.id"
        ids[who] = make_identity(id_paths[who])
    books = {
        "alice": {"bob": ids["bob"]},
        "bob": {"alice": ids["alice"]},
        "carol": {"alice": ids["alice"], "bob": ids["bob"]},
    }
    for who, book in books.items():
        _contacts(tmp / f"cfg-{who}", book)
    url = f"s3://{bucket_name}"
    args = ["--list-ttl", "0", "--endpoint-url", s3_server.endpoint_url, "--path-style"]
    w = World(tmp, s3_server.endpoint_url, bucket_name, env, ids, id_paths, {})
    with (
        mounted(url, tmp / "mnt-alice", id_paths["alice"], args=args, env=env) as a,
        mounted(url, tmp / "mnt-bob", id_paths["bob"], args=args, env=env) as b,
        mounted(url, tmp / "mnt-carol", id_paths["carol"], args=args, env=env) as c,
    ):
        for who, m in (("alice", a), ("bob", b), ("carol", c)):
            _contacts(Path(m.env["XDG_CONFIG_HOME"]), books[who])
            # The forged objects and the tampered policies below, reported by name.
            m.allow(r"WARNING cssfs\.encstore: object shared/(a\.bin|claims-alice\.txt): "
                    r"the writer's signature does not verify")
            m.allow(r"WARNING cssfs\.sharing: policy shared/\.cssfs-policy is not followed")
        w.mounts = {"alice": a, "bob": b, "carol": c}
        result = w.cli("alice", "share", "--store", url, FOLDER, "bob")
        assert result.returncode == 0, result.stderr
        yield w


def _open_fails(path: Path, code: int) -> None:
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno == code, info.value


def _xattr(path: Path, name: str) -> str:
    return os.getxattr(path, f"user.cssfs.{name}").decode()


def tst_alice_writes_bob_reads(w: World) -> None:
    data = CANARY + os.urandom(300_000)
    w.path("alice", "a.bin").write_bytes(data)
    w.mounts["alice"].sync()
    out = subprocess.run(["cat", os.fspath(w.path("bob", "a.bin"))], capture_output=True,
                         check=True).stdout
    assert out == data
    (w.tmp / "a.bin").write_bytes(data)
    subprocess.run(["cmp", os.fspath(w.tmp / "a.bin"), os.fspath(w.path("bob", "a.bin"))],
                   check=True)
    assert _xattr(w.path("bob", "a.bin"), "signature") == "valid"


def tst_bob_writes_alice_reads(w: World) -> None:
    w.path("bob", "b.txt").write_bytes(b"from bob\n")
    w.mounts["bob"].sync()
    assert w.path("alice", "b.txt").read_bytes() == b"from bob\n"
    writer = _xattr(w.path("alice", "b.txt"), "writer")
    assert writer in ("bob", w.ids["bob"].recipient.fingerprint)
    head = parse_header(w.raw_get(f"{FOLDER}/b.txt")[:HEADER_SIZE])
    assert head.writer == w.ids["bob"].recipient.ed25519
    assert set(head.key_ids) == {w.ids["alice"].recipient.key_id, w.ids["bob"].recipient.key_id}


def tst_carol_lists_but_cannot_open(w: World) -> None:
    names = set(os.listdir(w.mounts["carol"].path(FOLDER)))
    assert {"a.bin", "b.txt"} <= names
    for name in ("a.bin", "b.txt"):
        _open_fails(w.path("carol", name), errno.EACCES)
    assert _xattr(w.path("carol", "b.txt"), "writer") in ("bob", w.ids["bob"].recipient.fingerprint)


def _forge_payload_under_alices_header(w: World, key: str, new_plain: bytes) -> bytes:
    """Bob knows the file key (he is a recipient): new chunks, new table, a valid MAC -- but he
    cannot make Alice's signature cover the new table hash."""
    data = w.raw_get(key)
    opened = open_header(data[:HEADER_SIZE], w.ids["bob"], binding=object_binding(key))
    keys = derive_file_keys(opened.file_key, opened.header.salt)
    chunk = PayloadCipher(keys.payload_key).seal(0, new_plain, last=True)
    table = sha256(chunk)
    head = dataclasses.replace(
        opened.header, plain_size=len(new_plain), table_hash=sha256(table)
    )
    head = dataclasses.replace(head, mac=hmac_sha256(keys.mac_key, head.mac_input()))
    return head.to_bytes() + chunk + table


def _forge_file_claiming_alice(w: World, key: str, plain: bytes) -> bytes:
    """Bob writes an envelope for Alice and Carol and puts Alice's signing key as the writer."""
    bob = w.ids["bob"]
    writer = EnvelopeWriter(bob, [w.ids["alice"].recipient, w.ids["carol"].recipient],
                            binding=object_binding(key))
    chunk = writer.seal_chunk(plain, last=True)
    header_bytes, table = writer.finish()
    head = parse_header(header_bytes)
    opened = open_header(header_bytes, bob, binding=object_binding(key))
    keys = derive_file_keys(opened.file_key, head.salt)
    head = dataclasses.replace(head, writer=w.ids["alice"].recipient.ed25519)
    head = dataclasses.replace(head, mac=hmac_sha256(keys.mac_key, head.mac_input()))
    return head.to_bytes() + chunk + table


def tst_forgeries_are_refused(w: World) -> None:
    key = f"{FOLDER}/a.bin"
    w.raw_put(key, _forge_payload_under_alices_header(w, key, b"forged by bob"))
    for who in ("alice", "bob"):
        _open_fails(w.path(who, "a.bin"), errno.EIO)
        assert _xattr(w.path(who, "a.bin"), "signature") == "invalid"
    forged = f"{FOLDER}/claims-alice.txt"
    w.raw_put(forged, _forge_file_claiming_alice(w, forged, b"I am Alice, honest"))
    for who in ("alice", "carol"):
        _open_fails(w.path(who, "claims-alice.txt"), errno.EIO)
        assert _xattr(w.path(who, "claims-alice.txt"), "signature") == "invalid"
    # The forged objects can't be rekeyed by an unshare (it reports them): take them away.
    w.s3().delete_objects(Bucket=w.bucket, Delete={"Objects": [
        {"Key": key}, {"Key": forged}]})


def _new_file_key_ids(w: World, name: str) -> set[bytes]:
    w.path("alice", name).write_bytes(b"written while the policy is bad")
    w.mounts["alice"].sync()
    return set(parse_header(w.raw_get(f"{FOLDER}/{name}")[:HEADER_SIZE]).key_ids)


def tst_tampered_policy_is_not_followed(w: World) -> None:
    key = policy_key(FOLDER)
    good = w.raw_get(key)
    alice, bob, carol = (w.ids[n].recipient for n in ("alice", "bob", "carol"))
    # The bucket adds Carol to the policy, keeping Alice's signature: it no longer verifies.
    policy = parse_policy(good)
    forged = dataclasses.replace(
        policy, recipients=tuple(sorted((*policy.recipients, carol), key=recipient_entry))
    )
    parse_policy(forged.to_bytes())  # well-formed: only the signature gives it away
    w.raw_put(key, forged.to_bytes())
    ids = _new_file_key_ids(w, "after-tamper.txt")
    assert ids == {alice.key_id}  # not followed: Alice's defaults (herself only)
    assert "is not followed: its signature does not verify" in w.mounts["alice"].stderr()
    # Carol signs a policy of her own: valid, but Alice never made her a contact.
    result = w.cli("carol", "share", "--store", w.url, FOLDER, "bob")
    assert result.returncode == 0, result.stderr
    assert parse_policy(w.raw_get(key)).setter == carol
    ids = _new_file_key_ids(w, "after-carol.txt")
    assert ids == {alice.key_id}
    assert "not you or one of your contacts" in w.mounts["alice"].stderr()
    w.raw_put(key, good)
    assert _new_file_key_ids(w, "policy-back.txt") == {alice.key_id, bob.key_id}


def tst_unshare_bob(w: World) -> None:
    w.path("alice", "c.txt").write_bytes(b"before unshare")
    w.mounts["alice"].sync()
    assert w.path("bob", "c.txt").read_bytes() == b"before unshare"
    old_head = parse_header(w.raw_get(f"{FOLDER}/c.txt")[:HEADER_SIZE])
    # PATH inside the mount: the store comes from /proc/mounts (fsname=cssfs:<url>).
    result = w.cli("alice", "unshare", os.fspath(w.mounts["alice"].path(FOLDER)), "bob")
    assert result.returncode == 0, result.stderr
    new_head = parse_header(w.raw_get(f"{FOLDER}/c.txt")[:HEADER_SIZE])
    assert new_head.commitment != old_head.commitment  # a new file key
    assert w.ids["bob"].recipient.key_id not in new_head.key_ids
    _open_fails(w.path("bob", "c.txt"), errno.EACCES)
    assert w.path("alice", "c.txt").read_bytes() == b"before unshare"
    w.path("alice", "d.txt").write_bytes(b"after unshare")
    w.mounts["alice"].sync()
    _open_fails(w.path("bob", "d.txt"), errno.EACCES)
    assert w.path("alice", "d.txt").read_bytes() == b"after unshare"
    # Bob's own file was rekeyed too (Alice is now its writer); Alice still reads everything.
    _open_fails(w.path("bob", "b.txt"), errno.EACCES)
    assert w.path("alice", "b.txt").read_bytes() == b"from bob\n"
    head = parse_header(w.raw_get(f"{FOLDER}/b.txt")[:HEADER_SIZE])
    assert head.writer == w.ids["alice"].recipient.ed25519
    access = w.cli("alice", "access", os.fspath(w.mounts["alice"].path(FOLDER)))
    assert access.returncode == 0, access.stderr
    assert "policy: shared/.cssfs-policy" in access.stdout
    assert f"bob ({w.ids['bob'].recipient.fingerprint})" not in access.stdout
    assert f"me ({w.ids['alice'].recipient.fingerprint})" in access.stdout
    for who in ("bob", "carol"):
        assert CANARY.decode().strip() not in w.mounts[who].stderr()


STEPS = [
    tst_alice_writes_bob_reads,
    tst_bob_writes_alice_reads,
    tst_carol_lists_but_cannot_open,
    tst_forgeries_are_refused,
    tst_tampered_policy_is_not_followed,
    tst_unshare_bob,
]


@pytest.mark.parametrize("step", STEPS, ids=[s.__name__[4:] for s in STEPS])
def test_share_between_mounts(world: World, step: Any) -> None:
    step(world)
