"""memfs: the smallest useful pyfuse3 filesystem, to measure what Python FUSE itself costs.

It serves one read-only file ``data`` (the bytes of ``--source``, held in memory) and lets any
number of regular files be created, written, read back and unlinked in the root folder, all in
memory. No crypto, no network, no cache of its own, and ``keep_cache`` off, so every read and
write crosses the kernel and pyfuse3 exactly as a real filesystem's would: the throughput of this
fs is the ceiling any pyfuse3 filesystem (cssfs) can reach on this machine.

    python scripts/benchlib/memfs.py MNT --source FILE

Readiness: sends ``READY=1`` to ``$NOTIFY_SOCKET`` once mounted. Stops on SIGTERM/SIGINT (and
unmounts), or on ``fusermount3 -u MNT``. This module imports nothing from cssfs or benchlib.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import stat
import sys
from typing import Any

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE


class MemFS(pyfuse3.Operations):
    """Root folder of in-memory files; inode numbers are never reused."""

    enable_writeback_cache = False

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.names: dict[bytes, int] = {}
        self.blobs: dict[int, bytearray | bytes] = {}
        self.modes: dict[int, int] = {}
        self.next_inode = ROOT + 1
        ino = self._new(b"data", stat.S_IFREG | 0o444)
        self.blobs[ino] = data

    def _new(self, name: bytes, mode: int) -> int:
        ino = self.next_inode
        self.next_inode += 1
        self.names[name] = ino
        self.blobs[ino] = bytearray()
        self.modes[ino] = mode
        return ino

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        else:
            a.st_mode = self.modes[ino]
            a.st_nlink = 1
            a.st_size = len(self.blobs[ino])
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_blksize = 1 << 16
        a.st_blocks = (a.st_size + 511) // 512
        a.entry_timeout = 60
        a.attr_timeout = 60
        return a

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent != ROOT or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.names[name])

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode != ROOT and inode not in self.blobs:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            blob = self.blobs[inode]
            if not isinstance(blob, bytearray):
                raise pyfuse3.FUSEError(errno.EPERM)
            del blob[attr.st_size:]
            blob.extend(bytes(attr.st_size - len(blob)))
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = sorted(self.names.items(), key=lambda kv: kv[1])
        for name, ino in entries:
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), ino):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        blob = self.blobs[inode]
        if flags & os.O_TRUNC and isinstance(blob, bytearray):
            del blob[:]
        return pyfuse3.FileInfo(fh=inode, keep_cache=False)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if name in self.names:
            ino = self.names[name]
            blob = self.blobs[ino]
            if isinstance(blob, bytearray):
                del blob[:]
        else:
            ino = self._new(name, stat.S_IFREG | (mode & 0o7777))
        return pyfuse3.FileInfo(fh=ino, keep_cache=False), self._attr(ino)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.blobs[fh][off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        blob = self.blobs[fh]
        if not isinstance(blob, bytearray):
            raise pyfuse3.FUSEError(errno.EPERM)
        if off > len(blob):
            blob.extend(bytes(off - len(blob)))
        blob[off:off + len(buf)] = buf
        return len(buf)

    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        ino = self.names.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # Good enough for a bench fs: drop the bytes now (no open-unlinked semantics).
        self.blobs[ino] = bytearray()

    async def release(self, fh: int) -> None:
        return None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 255
        return s


def _notify_ready() -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", addr)


async def _run() -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        _notify_ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mountpoint")
    p.add_argument("--source", required=True, help="file whose bytes become /data")
    args = p.parse_args(argv)
    with open(args.source, "rb") as f:
        data = f.read()
    fs = MemFS(data)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=benchmemfs")
    opts.discard("default_permissions")
    pyfuse3.init(fs, args.mountpoint, opts)
    try:
        trio.run(_run)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
