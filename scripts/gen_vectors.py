#!/usr/bin/env python3
"""Generate the envelope test vectors in tests/vectors/ (one file per scenario).

Usage: python scripts/gen_vectors.py [OUTDIR]     (default: tests/vectors next to this script)

Every vector is made by one small function below from a fresh deterministic RNG: the ChaCha20
keystream (``cryptography``) under the 32-byte key b"TEST RANDOMNESS TEST RANDOMNESS!" with an
all-zero 16-byte nonce (block counter 0, nonce 0), consumed in order. Each function therefore
draws the same two identities first -- "alice" (the writer, and the vector's identity unless
stated) and "bob" -- then the envelope's randomness (file key, salt, one ephemeral key per
stanza), then anything else it needs. Rerunning the script reproduces the committed files byte
for byte (tests/test_vectors.py checks it), so a format change shows up as a diff here.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from cssfs.crypto import CHUNK_SIZE, PayloadCipher, derive_file_keys, hmac_sha256
from cssfs.envelope import (
    HEADER_SIZE,
    EnvelopeWriter,
    Header,
    open_header,
    parse_header,
)
from cssfs.keys import Identity, Recipient

RNG_KEY = b"TEST RANDOMNESS TEST RANDOMNESS!"
assert len(RNG_KEY) == 32


class TestRng:
    """Deterministic randomness: the ChaCha20 keystream under RNG_KEY, nonce 0, in order."""

    def __init__(self) -> None:
        self._stream = Cipher(algorithms.ChaCha20(RNG_KEY, bytes(16)), mode=None).encryptor()

    def __call__(self, n: int) -> bytes:
        return self._stream.update(bytes(n))


@dataclass(frozen=True)
class Vector:
    name: str
    expect: str  # success | no match | header failure | header MAC failure | ...
    plaintext: bytes  # what a streaming decoder may release (all of it on success)
    file_key: bytes
    identity: Identity
    comment: str
    envelope: bytes

    def render(self) -> bytes:
        identity_line = self.identity.to_file(None).decode("utf-8").splitlines()[-1]
        text = (
            f"expect: {self.expect}\n"
            f"payload: {hashlib.sha256(self.plaintext).hexdigest()}\n"
            f"file key: {self.file_key.hex()}\n"
            f"identity: {identity_line}\n"
            f"comment: {self.comment}\n"
            "\n"
        )
        return text.encode("utf-8") + self.envelope


# -- building blocks ------------------------------------------------------------------------


@dataclass
class Parts:
    """An envelope taken apart, so a vector can change one thing and put it back together."""

    header: Header
    chunks: list[bytes]
    table: bytes
    file_key: bytes

    def join(self, header: bytes | None = None) -> bytes:
        head = self.header.to_bytes() if header is None else header
        return head + b"".join(self.chunks) + self.table

    def remac(self) -> None:
        """Recompute the header MAC (what anyone holding the file key can do)."""
        mac_key = derive_file_keys(self.file_key, self.header.salt).mac_key
        self.header = replace(self.header, mac=hmac_sha256(mac_key, self.header.mac_input()))

    def cipher(self) -> PayloadCipher:
        return PayloadCipher(derive_file_keys(self.file_key, self.header.salt).payload_key)


def start() -> tuple[TestRng, Identity, Identity]:
    rng = TestRng()
    return rng, Identity.generate(rng), Identity.generate(rng)


def seal(
    rng: TestRng,
    writer: Identity,
    plaintext: bytes,
    recipients: tuple[Recipient, ...] = (),
    *,
    mtime_ns: int = 1_700_000_000_000_000_000,
    mode: int = 0o644,
) -> Parts:
    w = EnvelopeWriter(writer, recipients, mtime_ns=mtime_ns, mode=mode, rng=rng)
    pieces = [plaintext[i : i + CHUNK_SIZE] for i in range(0, len(plaintext), CHUNK_SIZE)] or [b""]
    chunks = [w.seal_chunk(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    header_bytes, table = w.finish()
    header = parse_header(header_bytes)
    file_key = open_header(header, writer).file_key
    return Parts(header, chunks, table, file_key)


def text(n: int) -> bytes:
    """n bytes of readable, position-dependent plaintext."""
    line = b"cssfs test vector plaintext, line %08d\n"
    out = b"".join(line % i for i in range(n // 39 + 1))
    return out[:n]


TWO_CHUNKS = CHUNK_SIZE + 100


# -- the vectors ----------------------------------------------------------------------------


def _success(name: str, size: int) -> Callable[[], Vector]:
    def make() -> Vector:
        rng, alice, _ = start()
        pt = text(size)
        p = seal(rng, alice, pt)
        return Vector(name, "success", pt, p.file_key, alice,
                      f"a {size}-byte file, decrypted by its writer", p.join())
    return make


def success_other_recipient() -> Vector:
    rng, alice, bob = start()
    pt = text(1000)
    p = seal(rng, alice, pt, (bob.recipient,))
    return Vector("success_other_recipient", "success", pt, p.file_key, bob,
                  "written by alice for bob; bob decrypts with the second stanza", p.join())


def success_key_id_collision() -> Vector:
    rng, alice, bob = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    # A stanza with alice's key id but wrapped to bob comes first: a decoder must try every
    # stanza whose key id matches, not only the first.
    decoy = seal(rng, alice, b"", (bob.recipient,)).header.stanzas[1]
    decoy = replace(decoy, key_id=alice.recipient.key_id)
    p.header = replace(p.header, stanzas=(decoy, *p.header.stanzas))
    p.remac()
    return Vector("success_key_id_collision", "success", pt, p.file_key, alice,
                  "first stanza has our key id but another key; the second one opens",
                  p.join())


def no_match() -> Vector:
    rng, alice, bob = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    return Vector("no_match", "no match", pt, p.file_key, bob,
                  "written by alice for herself only; bob has no stanza", p.join())


def header_salt_tampered() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[32] ^= 0x01
    return Vector("header_salt_tampered", "header MAC failure", pt, p.file_key, alice,
                  "one bit of the salt flipped: the key commitment no longer matches",
                  p.join(bytes(raw)))


def header_mtime_tampered() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[23] ^= 0x01
    return Vector("header_mtime_tampered", "header MAC failure", pt, p.file_key, alice,
                  "mtime changed (not signed): the header MAC catches it", p.join(bytes(raw)))


def header_mac_tampered() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    p.header = replace(p.header, mac=bytes(32))
    return Vector("header_mac_tampered", "header MAC failure", pt, p.file_key, alice,
                  "the header MAC replaced by zeros", p.join())


def stanza_tampered() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[178 + 8 + 32] ^= 0x80  # first byte of the wrapped file key
    return Vector("stanza_tampered", "header MAC failure", pt, p.file_key, alice,
                  "wrapped file key of our only stanza flipped: the unwrap fails",
                  p.join(bytes(raw)))


def stanza_low_order_share() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    s = p.header.stanzas[0]
    p.header = replace(p.header, stanzas=(replace(s, ephemeral=bytes(32)),))
    p.remac()
    return Vector("stanza_low_order_share", "header MAC failure", pt, p.file_key, alice,
                  "ephemeral share is the all-zero (low-order) point: ECDH must be refused",
                  p.join())


def co_recipient_new_file_key() -> Vector:
    rng, alice, bob = start()
    pt = text(1000)
    p = seal(rng, alice, pt, (bob.recipient,))
    # bob re-encrypts other content under a new file key, rewraps it to alice and re-MACs,
    # but cannot change the signed commitment.
    forged = seal(rng, alice, text(1000).upper(), (bob.recipient,))
    p.header = replace(forged.header, commitment=p.header.commitment,
                       table_hash=p.header.table_hash, signature=p.header.signature)
    p.file_key = forged.file_key
    p.remac()
    p.chunks, p.table = forged.chunks, forged.table
    return Vector("co_recipient_new_file_key", "header MAC failure", pt, p.file_key, alice,
                  "a co-recipient swapped in its own file key; the signed commitment differs",
                  p.join())


def signature_other_key() -> Vector:
    rng, alice, bob = start()
    pt = text(1000)
    p = seal(rng, alice, pt, (bob.recipient,))
    p.header = replace(p.header, signature=bob.sign(p.header.signed_message()))
    return Vector("signature_other_key", "signature failure", pt, p.file_key, alice,
                  "names alice as writer but is signed by bob", p.join())


def co_recipient_new_commitment() -> Vector:
    rng, alice, bob = start()
    pt = text(1000)
    p = seal(rng, alice, pt, (bob.recipient,))
    forged = seal(rng, alice, text(1000).upper(), (bob.recipient,))
    p.header = replace(forged.header, signature=p.header.signature)
    p.file_key = forged.file_key
    p.remac()
    p.chunks, p.table = forged.chunks, forged.table
    return Vector("co_recipient_new_commitment", "signature failure", pt, p.file_key, alice,
                  "a co-recipient's new file key, commitment and table under alice's old "
                  "signature", p.join())


def chunk_flipped() -> Vector:
    rng, alice, _ = start()
    pt = text(TWO_CHUNKS)
    p = seal(rng, alice, pt)
    c = bytearray(p.chunks[1])
    c[10] ^= 0x01
    p.chunks[1] = bytes(c)
    return Vector("chunk_flipped", "payload failure", pt, p.file_key, alice,
                  "one bit flipped in the second (last) chunk", p.join())


def chunk_tag_flipped() -> Vector:
    rng, alice, _ = start()
    pt = text(TWO_CHUNKS)
    p = seal(rng, alice, pt)
    c = bytearray(p.chunks[0])
    c[-1] ^= 0x01
    p.chunks[0] = bytes(c)
    return Vector("chunk_tag_flipped", "payload failure", pt, p.file_key, alice,
                  "one bit flipped in the GCM tag of the first chunk", p.join())


def chunks_swapped() -> Vector:
    rng, alice, _ = start()
    pt = text(2 * CHUNK_SIZE)
    p = seal(rng, alice, pt)
    p.chunks[0], p.chunks[1] = p.chunks[1], p.chunks[0]
    return Vector("chunks_swapped", "payload failure", pt, p.file_key, alice,
                  "the two full chunks of a 128 KiB file swapped", p.join())


def truncated_chunk_edge() -> Vector:
    rng, alice, _ = start()
    pt = text(TWO_CHUNKS)
    p = seal(rng, alice, pt)
    env = p.join()
    return Vector("truncated_chunk_edge", "payload failure", pt, p.file_key, alice,
                  "cut right after the first chunk (last chunk and table missing)",
                  env[: HEADER_SIZE + len(p.chunks[0])])


def truncated_table() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    return Vector("truncated_table", "payload failure", pt, p.file_key, alice,
                  "the last 16 bytes of the chunk table cut off", p.join()[:-16])


def last_flag_missing() -> Vector:
    rng, alice, _ = start()
    pt = text(TWO_CHUNKS)
    p = seal(rng, alice, pt)
    # The first chunk re-sealed (with the file key) as if it were the last one: a decoder
    # must take the last-chunk flag from the authenticated size, not from the chunk.
    cipher = p.cipher()
    p.chunks[0] = cipher.seal(0, pt[:CHUNK_SIZE], last=True)
    return Vector("last_flag_missing", "payload failure", pt, p.file_key, alice,
                  "first chunk sealed with the last-chunk flag, file claims two chunks",
                  p.join())


def trailing_data() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    return Vector("trailing_data", "payload failure", pt, p.file_key, alice,
                  "one zero byte after the chunk table", p.join() + b"\x00")


def chunk_from_other_file() -> Vector:
    rng, alice, _ = start()
    pt = text(TWO_CHUNKS)
    p = seal(rng, alice, pt)
    other = seal(rng, alice, pt)
    p.chunks[1] = other.chunks[1]
    return Vector("chunk_from_other_file", "payload failure", pt, p.file_key, alice,
                  "second chunk taken from another envelope of the same plaintext and writer",
                  p.join())


def table_tampered() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    p.table = bytes(32)
    return Vector("table_tampered", "payload failure", pt, p.file_key, alice,
                  "the chunk table replaced by zeros", p.join())


def co_recipient_forged_chunk() -> Vector:
    rng, alice, bob = start()
    pt = text(1000)
    p = seal(rng, alice, pt, (bob.recipient,))
    forged = pt.upper()
    p.chunks[0] = p.cipher().seal(0, forged, last=True)
    return Vector("co_recipient_forged_chunk", "payload failure", forged, p.file_key, alice,
                  "bob re-encrypted the chunk with the file key: its GCM tag is valid but it "
                  "is not in alice's signed table (a streaming decoder may release it first)",
                  p.join())


def header_bad_magic() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[0:6] = b"age\x00\x00\x00"
    return Vector("header_bad_magic", "header failure", pt, p.file_key, alice,
                  "wrong magic", p.join(bytes(raw)))


def header_unknown_version() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[6] = 2
    return Vector("header_unknown_version", "header failure", pt, p.file_key, alice,
                  "version 2", p.join(bytes(raw)))


def header_bad_chunk_size() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[7] = 17
    return Vector("header_bad_chunk_size", "header failure", pt, p.file_key, alice,
                  "log2 chunk size 17 (v1 allows only 16)", p.join(bytes(raw)))


def header_bad_padding() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[HEADER_SIZE - 1] = 1
    return Vector("header_bad_padding", "header failure", pt, p.file_key, alice,
                  "last byte of the header padding is not zero", p.join(bytes(raw)))


def header_reserved_nonzero() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[31] = 1
    return Vector("header_reserved_nonzero", "header failure", pt, p.file_key, alice,
                  "reserved field is 1", p.join(bytes(raw)))


def header_bad_mode() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[25] |= 0x80  # bit 23 of the mode: outside 0o7777
    return Vector("header_bad_mode", "header failure", pt, p.file_key, alice,
                  "mode has a bit outside 0o7777", p.join(bytes(raw)))


def header_no_stanzas() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[176:178] = b"\x00\x00"
    return Vector("header_no_stanzas", "header failure", pt, p.file_key, alice,
                  "stanza count 0", p.join(bytes(raw)))


def header_too_many_stanzas() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    raw = bytearray(p.header.to_bytes())
    raw[176:178] = (44).to_bytes(2, "big")
    return Vector("header_too_many_stanzas", "header failure", pt, p.file_key, alice,
                  "stanza count 44 (the most that fit is 43)", p.join(bytes(raw)))


def header_short() -> Vector:
    rng, alice, _ = start()
    pt = text(1000)
    p = seal(rng, alice, pt)
    return Vector("header_short", "header failure", pt, p.file_key, alice,
                  "the object ends inside the header region", p.join()[:HEADER_SIZE - 1])


VECTORS: tuple[Callable[[], Vector], ...] = (
    _success("success_empty", 0),
    _success("success_1", 1),
    _success("success_65536", CHUNK_SIZE),
    _success("success_65537", CHUNK_SIZE + 1),
    success_other_recipient,
    success_key_id_collision,
    no_match,
    header_salt_tampered,
    header_mtime_tampered,
    header_mac_tampered,
    stanza_tampered,
    stanza_low_order_share,
    co_recipient_new_file_key,
    signature_other_key,
    co_recipient_new_commitment,
    chunk_flipped,
    chunk_tag_flipped,
    chunks_swapped,
    truncated_chunk_edge,
    truncated_table,
    last_flag_missing,
    trailing_data,
    chunk_from_other_file,
    table_tampered,
    co_recipient_forged_chunk,
    header_bad_magic,
    header_unknown_version,
    header_bad_chunk_size,
    header_bad_padding,
    header_reserved_nonzero,
    header_bad_mode,
    header_no_stanzas,
    header_too_many_stanzas,
    header_short,
)


def all_vectors() -> list[Vector]:
    vectors = [make() for make in VECTORS]
    names = [v.name for v in vectors]
    assert len(set(names)) == len(names), "duplicate vector name"
    return vectors


def generate(outdir: Path) -> list[Path]:
    """Write every vector to ``outdir``/<name>.txt; returns the paths written."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for vector in all_vectors():
        path = outdir / f"{vector.name}.txt"
        path.write_bytes(vector.render())
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    outdir = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent.parent / "tests" / "vectors"
    for path in generate(outdir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

