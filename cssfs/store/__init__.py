"""cssfs.store: object stores (S3, a local folder, memory) behind one async interface.

Knows nothing of crypto. ``open_store(url)`` picks the implementation; the contract is in
:mod:`cssfs.store.base` and docs/INTERNALS.md. Importing this package does not import boto3
(only :mod:`cssfs.store.s3` does, and only when an S3 store is opened).
"""

from cssfs.store.base import (
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    Body,
    Listing,
    ObjectInfo,
    ObjectStore,
    PartSource,
    StoreStats,
)
from cssfs.store.retry import RetryPolicy
from cssfs.store.url import open_store

__all__ = [
    "DEFAULT_PART_SIZE",
    "MIN_PART_SIZE",
    "Body",
    "Listing",
    "ObjectInfo",
    "ObjectStore",
    "PartSource",
    "RetryPolicy",
    "StoreStats",
    "open_store",
]
