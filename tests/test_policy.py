"""policy: canonical encoding, sign/verify, tamper, untrusted setter, folder binding, fuzzing."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cssfs.errors import FormatError, SignatureError, UntrustedWriterError
from cssfs.keys import Identity, Recipient
from cssfs.policy import (
    Trust,
    check_folder,
    check_policy,
    check_trusted_writer,
    folder_chain,
    folder_of,
    is_internal,
    make_policy,
    parse_policy,
    policy_key,
)


def _rng(seed: bytes):
    state = [0]

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(seed + state[0].to_bytes(8, "big")).digest()
            state[0] += 1
        return out[:n]

    return rng


ALICE = Identity.generate(_rng(b"alice"))
BOB = Identity.generate(_rng(b"bob"))
CAROL = Identity.generate(_rng(b"carol"))
PEM_ONLY = Recipient(bytes(range(32)), None)


class _Contact:
    def __init__(self, name: str, recipient: Recipient) -> None:
        self.name = name
        self.recipient = recipient


def test_roundtrip_is_canonical_and_verifies() -> None:
    p = make_policy(ALICE, "docs/reports", 3, [CAROL.recipient, BOB.recipient, BOB.recipient],
                    ["team", "alpha"])
    data = p.to_bytes()
    q = parse_policy(data)
    assert q == p
    assert q.to_bytes() == data
    q.verify()
    assert q.groups == ("alpha", "team")
    assert len(q.recipients) == 2
    assert data.startswith(b"cssfs-policy v1\nfolder /docs/reports\nversion 3\nsetter cssfs1")
    assert data.endswith(b"\n")


def test_odd_folder_names_are_percent_encoded() -> None:
    p = make_policy(ALICE, "a b/ünï/%x", 1, [PEM_ONLY])
    data = p.to_bytes()
    assert b"folder /a%20b/%C3%BCn%C3%AF/%25x\n" in data
    assert b"recipient x25519:000102" in data
    assert parse_policy(data) == p


def test_root_policy() -> None:
    p = make_policy(ALICE, "", 1, [BOB.recipient])
    assert p.key == ".cssfs-policy"
    assert b"folder /\n" in p.to_bytes()
    assert parse_policy(p.to_bytes()).folder == ""


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.replace(b"version 3", b"version 4"),
        lambda d: d.replace(b"/docs", b"/doc2"),
        lambda d: d.replace(b"group team\n", b""),
    ],
)
def test_tampered_policy_does_not_verify(mutate) -> None:
    p = make_policy(ALICE, "docs", 3, [BOB.recipient], ["team"])
    data = mutate(p.to_bytes())
    q = parse_policy(data)
    with pytest.raises(SignatureError):
        q.verify()
    trust = Trust.of(BOB.recipient, [_Contact("alice", ALICE.recipient)])
    verdict = check_policy(data, q.folder, trust)
    assert not verdict.followed
    assert verdict.problem is not None and "signature" in verdict.problem


def test_added_recipient_is_detected() -> None:
    p = make_policy(ALICE, "docs", 1, [BOB.recipient])
    forged_body = p.to_bytes().replace(
        b"recipient ", b"recipient " + CAROL.recipient.to_string().encode() + b"\nrecipient ", 1
    )
    # Either non-canonical order (FormatError) or a bad signature: never followed.
    verdict = check_policy(forged_body, "docs", Trust.of(ALICE.recipient))
    assert not verdict.followed


def test_trust_rules() -> None:
    p = make_policy(CAROL, "docs", 1, [BOB.recipient])
    data = p.to_bytes()
    bob_no_carol = Trust.of(BOB.recipient, [_Contact("alice", ALICE.recipient)])
    verdict = check_policy(data, "docs", bob_no_carol)
    assert not verdict.followed
    assert verdict.problem is not None and "not you or one of your contacts" in verdict.problem
    bob_knows_carol = Trust.of(BOB.recipient, [_Contact("carol", CAROL.recipient)])
    assert check_policy(data, "docs", bob_knows_carol).followed
    # Setter is the reader themself.
    assert check_policy(data, "docs", Trust.of(CAROL.recipient)).followed


def test_policy_copied_to_another_folder_is_refused() -> None:
    data = make_policy(ALICE, "public", 1, [BOB.recipient]).to_bytes()
    verdict = check_policy(data, "private", Trust.of(ALICE.recipient))
    assert not verdict.followed
    assert verdict.problem is not None and "another folder" in verdict.problem


def test_rollback_is_refused() -> None:
    data = make_policy(ALICE, "d", 2, [BOB.recipient]).to_bytes()
    trust = Trust.of(ALICE.recipient)
    assert check_policy(data, "d", trust, min_version=2).followed
    assert not check_policy(data, "d", trust, min_version=3).followed


def test_with_changes_bumps_version_and_resigns() -> None:
    p = make_policy(ALICE, "d", 1, [ALICE.recipient, BOB.recipient], ["g"])
    q = p.with_changes(BOB, add=[CAROL.recipient], remove=[ALICE.recipient.key_id],
                       remove_groups=["g"])
    assert q.version == 2
    assert q.setter == BOB.recipient
    assert {r.key_id for r in q.recipients} == {BOB.recipient.key_id, CAROL.recipient.key_id}
    assert q.groups == ()
    q.verify()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"cssfs-policy v1\n",
        b"cssfs-policy v2\nsignature AAAA\n",
        b"cssfs-policy v1\nfolder /\nversion 01\n",
        b"\xff\xfe",
    ],
)
def test_malformed_is_format_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_policy(data)


def test_noncanonical_variants_are_rejected() -> None:
    data = make_policy(ALICE, "docs", 3, [BOB.recipient, CAROL.recipient], ["a", "b"]).to_bytes()
    variants = [
        data.replace(b"\n", b"\r\n"),
        data[:-1],
        data + b"\n",
        data.replace(b"version 3", b"version  3"),
        data.replace(b"version 3", b"version 03"),
        data.replace(b"group a\ngroup b", b"group b\ngroup a"),
        data.replace(b"folder /docs", b"folder /d%6Fcs"),
        data.replace(b"folder /docs", b"folder docs"),
        data.replace(b"signature ", b"signature  "),
    ]
    lines = data.split(b"\n")
    rec = [i for i, line in enumerate(lines) if line.startswith(b"recipient ")]
    swapped = list(lines)
    swapped[rec[0]], swapped[rec[1]] = swapped[rec[1]], swapped[rec[0]]
    variants.append(b"\n".join(swapped))
    for v in variants:
        with pytest.raises(FormatError):
            parse_policy(v)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_only_format_errors(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_policy(data)


_VALID = make_policy(ALICE, "x/y", 7, [BOB.recipient, PEM_ONLY], ["grp"]).to_bytes()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255))
def test_fuzz_byte_flips(pos: int, value: int) -> None:
    data = bytearray(_VALID)
    data[pos] = value
    try:
        p = parse_policy(bytes(data))
    except FormatError:
        return
    if bytes(data) != _VALID:
        with pytest.raises(SignatureError):
            p.verify()


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["a", "b c", "ü", "%", "d-e_f.g~"]), max_size=4))
def test_fuzz_folder_roundtrip(parts: list[str]) -> None:
    folder = "/".join(parts)
    p = make_policy(ALICE, folder, 1, [])
    assert parse_policy(p.to_bytes()) == p


def test_names() -> None:
    assert policy_key("a/b") == "a/b/.cssfs-policy"
    assert folder_chain("a/b") == ["a/b", "a", ""]
    assert folder_chain("") == [""]
    assert folder_of("a/b/c.txt") == "a/b"
    assert folder_of("c.txt") == ""
    assert is_internal(".cssfs-groups/x/members/abc")
    assert is_internal("a/.cssfs-policy")
    assert not is_internal("a/cssfs-policy")
    for bad in ("/a", "a/", "a//b", "a/../b", "a/.cssfs-x"):
        with pytest.raises(ValueError):
            check_folder(bad)


def test_trusted_writer_check() -> None:
    trust = Trust.of(ALICE.recipient, [_Contact("bob", BOB.recipient)])
    assert BOB.recipient.ed25519 is not None and CAROL.recipient.ed25519 is not None
    check_trusted_writer(BOB.recipient.ed25519, trust)
    with pytest.raises(UntrustedWriterError, match="ed25519:"):
        check_trusted_writer(CAROL.recipient.ed25519, trust)
    assert trust.describe_signer(BOB.recipient.ed25519) == "bob"
    assert trust.name_for_key_id(ALICE.recipient.key_id) == "me"
