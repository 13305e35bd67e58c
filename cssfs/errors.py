"""The one exception hierarchy of cssfs.

Every error the project raises on purpose is a subclass of :class:`CssfsError`. Messages are one
line, name the object or file concerned, and never contain plaintext, key material or a
passphrase. This module imports nothing from cssfs.
"""

from __future__ import annotations


class CssfsError(Exception):
    """Base class: a failure cssfs understands and can report in one line."""


# -- envelope format and crypto --------------------------------------------------------------


class FormatError(CssfsError):
    """Bytes that are not a well-formed cssfs envelope, identity or key (header failure)."""


class UnsupportedVersionError(FormatError):
    """An envelope or key file of a format version this cssfs does not know."""


class NoIdentityMatchError(CssfsError):
    """The envelope has no stanza that the given identity can unwrap (not shared with you)."""


class HeaderAuthError(CssfsError):
    """The header does not authenticate: MAC, key commitment or a stanza for us failed."""


class BindingError(HeaderAuthError):
    """The envelope is authentic but belongs to another object key (moved or swapped)."""


class SignatureError(CssfsError):
    """The writer's Ed25519 signature does not verify."""


class PayloadError(CssfsError):
    """The payload failed to authenticate: corrupted, reordered, truncated or extended."""


class ChunkAuthError(PayloadError):
    """One payload chunk failed its hash-table entry or its AES-GCM tag."""

    def __init__(self, index: int, detail: str = "does not authenticate") -> None:
        super().__init__(f"chunk {index} {detail}")
        self.index = index


class TruncatedError(PayloadError):
    """The envelope ends before its last chunk or its chunk table."""


class TrailingDataError(PayloadError):
    """Bytes follow the end of the envelope."""


class KeyFormatError(FormatError):
    """A malformed recipient string, identity file or PEM key."""


class PassphraseError(CssfsError):
    """The passphrase does not decrypt the identity file."""


class UntrustedWriterError(CssfsError):
    """The file's writer is not in the contacts and only trusted writers may be opened."""


# -- configuration ---------------------------------------------------------------------------


class ConfigError(CssfsError):
    """Bad configuration: missing identity, unknown contact, bad store URL, bad option."""


# -- object stores ---------------------------------------------------------------------------


class StoreError(CssfsError):
    """An object store operation failed."""


class NoSuchObjectError(StoreError):
    """The object (or upload) does not exist."""


class NoSuchBucketError(StoreError):
    """The bucket or store root does not exist."""


class AccessDeniedError(StoreError):
    """The store refused the credentials or the operation (permanent)."""


class PreconditionFailedError(StoreError):
    """A conditional put found another version (If-Match) or an existing object (If-None-Match)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or kept failing after every retry (transient, exhausted)."""


# -- the mount's local state -----------------------------------------------------------------


class JournalError(CssfsError):
    """A closed file could not be made durable in the mount's journal (disk full, state
    directory not writable), or a journal entry is damaged. ``errno`` (ENOSPC, EACCES, EIO...)
    tells the mount which error to give the writer; None for a damaged entry."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# -- nursery failures ------------------------------------------------------------------------


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a failed nursery is about, to report as itself instead of a group.

    Nurseries here run a few tasks of one operation (or the mount's daemon tasks): the first
    leaf that is a CssfsError or an OSError, else the first that is an Exception (not a
    cancellation, which is only the echo of the real failure), else the first leaf.
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    for kinds in ((CssfsError, OSError), Exception):
        for leaf in leaves:
            if isinstance(leaf, kinds):
                return leaf
    return leaves[0]
