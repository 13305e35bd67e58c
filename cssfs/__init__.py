"""cssfs: an encrypted filesystem over S3, shared by public key.

Importing this package loads nothing heavy; see cssfs.cli for the entry point.
"""

__version__ = "0.1.0"
