"""store.url: a store URL (or bare bucket name or path) -> the ObjectStore it names.

Knows: the URL forms below and which store class serves each. Must not know: crypto, FUSE.
boto3 is imported only when an S3 store is asked for, so local and memory stores work without it.

=============================  ========================================================
``s3://bucket[/prefix]``       S3Store on ``bucket``, keys under ``prefix/``
``bucket``                     the same (a bare bucket name: no scheme, no slash)
``file:///path``               LocalStore rooted at ``/path`` (the folder must exist)
``/path``, ``./p``, ``../p``,  LocalStore too (``~`` is expanded)
``~/p``
``memory://``                  a fresh MemoryStore (tests)
``memory://name[/prefix]``     the process-wide MemoryStore bucket ``name`` (tests)
=============================  ========================================================

Anything else is a ``ConfigError`` with a one-line hint. S3-only options (``endpoint_url``,
``region``, ``profile``, ``path_style``, ...) given for a local or memory store are an error too,
rather than being silently ignored.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from cssfs.errors import ConfigError
from cssfs.store.base import ObjectStore

__all__ = ["open_store"]

# Real bucket names are 3-63 of [a-z0-9.-]; older buckets and other S3 implementations allow
# upper case and underscores, so accept those and let the server judge.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    path_style: bool | None = None,
    **options: Any,
) -> ObjectStore:
    """The store ``url`` names (see the module docstring). ``options`` go to the store class
    (``part_size`` for every store; ``concurrency``, ``max_connections``, ``retry``,
    ``connect_timeout``, ``read_timeout``, ``list_page_size`` for S3; ``fsync`` for a folder).
    Options set to None are ignored. Creating the store does no network I/O."""
    options = {k: v for k, v in options.items() if v is not None}
    s3_options: dict[str, Any] = {
        k: v
        for k, v in {
            "endpoint_url": endpoint_url,
            "region": region,
            "profile": profile,
            "path_style": path_style,
        }.items()
        if v is not None
    }
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("empty store URL: give s3://bucket[/prefix], a bucket name or a path")
    url = url.strip()
    scheme, _, rest = url.partition("://") if "://" in url else ("", "", url)
    scheme = scheme.lower()

    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        return _s3(url, bucket, prefix, s3_options, options)
    if scheme in ("", "file", "memory") and s3_options:
        raise ConfigError(f"{url}: {', '.join(sorted(s3_options))} only apply to s3:// stores")
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"{url}: a file URL is file:///absolute/path")
        if parts.query or parts.fragment:
            raise ConfigError(f"{url}: a file URL takes no query or fragment")
        return _local(unquote(parts.path), options)
    if scheme == "memory":
        return _memory(url, rest, options)
    if scheme:
        raise ConfigError(f"{url}: unknown store scheme {scheme!r} (use s3://, file:// or a path)")
    if url.startswith(("/", "./", "../", "~")) or url in (".", ".."):
        return _local(os.path.expanduser(url), options)
    if "/" not in url and _BUCKET.fullmatch(url):
        return _s3(url, url, "", s3_options, options)
    raise ConfigError(
        f"{url}: not a store URL; use s3://bucket/prefix, a bare bucket name, "
        "file:///path, /absolute/path or ./relative/path"
    )


def _check_options(url: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(f"{url}: option(s) {', '.join(sorted(unknown))} do not apply here")


def _s3(
    url: str, bucket: str, prefix: str, s3_options: dict[str, Any], options: dict[str, Any]
) -> ObjectStore:
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(f"{url}: {bucket!r} is not a valid bucket name")
    if prefix.startswith("/") or "//" in prefix:
        raise ConfigError(f"{url}: empty path component in the prefix")
    _check_options(
        url,
        options,
        {
            "part_size",
            "concurrency",
            "max_connections",
            "retry",
            "connect_timeout",
            "read_timeout",
            "list_page_size",
            "min_part_size",
            "copy_part_size",
            "seed",
        },
    )
    from cssfs.store.s3 import S3Store  # boto3 is loaded only for S3 stores

    return S3Store(bucket, prefix, **s3_options, **options)


def _local(path: str, options: dict[str, Any]) -> ObjectStore:
    _check_options(path, options, {"part_size", "fsync", "threads"})
    from cssfs.store.local import LocalStore

    return LocalStore(path, **options)


def _memory(url: str, rest: str, options: dict[str, Any]) -> ObjectStore:
    _check_options(url, options, {"part_size"})
    from cssfs.store.memory import MemoryStore

    name, _, prefix = rest.partition("/")
    return MemoryStore(prefix, name=name, **options)
