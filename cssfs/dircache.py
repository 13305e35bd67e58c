"""dircache: folder listings kept for a short time, with our own changes applied on top.

What it knows: folder paths (as in inodes.py), entry names, a clock, and opaque entries (fs.py
stores encstore's listing entries here). What it must not know: stores, envelopes, pyfuse3.

A listing is fetched by a loader (one LIST), shared by every task that asks for the same folder
while it runs (single flight), and served from memory for ``ttl`` seconds; so other clients'
changes appear after at most ``ttl``. Our own changes must show at once, including while a LIST
that started before them is still running: every change is recorded as an *edit* with the time
it was made. A finished LIST drops the edits made before it started (the store already shows
them) and applies the edits made while it ran (the store may not have). ``ttl == 0`` still
shares one LIST between concurrent callers but keeps nothing afterwards.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

log = logging.getLogger(__name__)

E = TypeVar("E")



@dataclass
class _Folder(Generic[E]):
    entries: dict[str, E] | None = None
    started: float = 0.0
    edits: dict[str, tuple[float, E | None]] = field(default_factory=dict)
    loading: trio.Event | None = None
    error: BaseException | None = None


class DirCache(Generic[E]):
    """Listings by folder path; ``E`` is the entry type (None in an edit means "removed")."""

    def __init__(
        self,
        ttl: float,
        *,
        max_folders: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_folders = max_folders
        self._clock = clock
        self._folders: OrderedDict[str, _Folder[E]] = OrderedDict()
        self.lists = 0  # LISTs actually issued (tests and stats)

    def _folder(self, path: str) -> _Folder[E]:
        folder = self._folders.get(path)
        if folder is None:
            folder = self._folders[path] = _Folder()
            self._trim()
        else:
            self._folders.move_to_end(path)
        return folder

    def _trim(self) -> None:
        while len(self._folders) > self.max_folders:
            for path, folder in self._folders.items():
                if folder.loading is None:
                    del self._folders[path]
                    break
            else:
                return

    def _fresh(self, folder: _Folder[E]) -> bool:
        return folder.entries is not None and self._clock() - folder.started < self.ttl

    def cached(self, path: str) -> dict[str, E] | None:
        """The listing of ``path`` if one is fresh, else None (never issues a LIST)."""
        folder = self._folders.get(path)
        if folder is None or not self._fresh(folder):
            return None
        return folder.entries

    def expires_in(self, path: str) -> float:
        """Seconds until the listing of ``path`` stops being fresh (0 if it is not)."""
        folder = self._folders.get(path)
        if folder is None or folder.entries is None:
            return 0.0
        return max(0.0, folder.started + self.ttl - self._clock())

    def loading(self, path: str) -> bool:
        """Whether a LIST of ``path`` is running now."""
        folder = self._folders.get(path)
        return folder is not None and folder.loading is not None

    def peek(self, path: str) -> dict[str, E] | None:
        """The last listing of ``path`` even if it is no longer fresh (None if there is none):
        for guesses that may be wrong (which files to read ahead), never for answers."""
        folder = self._folders.get(path)
        return None if folder is None else folder.entries

    async def get(self, path: str, loader: Callable[[], Awaitable[dict[str, E]]]) -> dict[str, E]:
        """The listing of ``path``: fresh from memory, or from ``loader`` (one at a time)."""
        while True:
            folder = self._folder(path)
            if self._fresh(folder):
                assert folder.entries is not None
                return folder.entries
            if folder.loading is None:
                break
            event = folder.loading
            await event.wait()
            if folder.error is not None and folder.loading is None:
                raise folder.error
            if folder.entries is not None and folder.loading is None:
                # The load we waited for succeeded; use it even if ttl is 0.
                return folder.entries
        return await self._load(folder, loader)

    def due(self, path: str, fraction: float) -> bool:
        """Whether the listing of ``path`` is fresh but at least ``fraction`` of the ttl old,
        with no load running: worth loading again ahead of its expiry (``refresh``)."""
        folder = self._folders.get(path)
        return (folder is not None and folder.loading is None and self._fresh(folder)
                and self._clock() - folder.started >= self.ttl * fraction)

    async def refresh(self, path: str, loader: Callable[[], Awaitable[dict[str, E]]]) -> None:
        """Load the listing of ``path`` again although it is still fresh (refresh-ahead: a
        folder in active use never makes its lookups wait for a LIST). Callers keep getting
        the current listing meanwhile; nothing happens if a load already runs or the listing
        expired (then the next ``get`` loads it)."""
        folder = self._folders.get(path)
        if folder is None or folder.loading is not None or not self._fresh(folder):
            return
        await self._load(folder, loader)

    async def _load(self, folder: _Folder[E], loader: Callable[[], Awaitable[dict[str, E]]]
                    ) -> dict[str, E]:
        folder.loading = trio.Event()
        folder.error = None
        started = self._clock()
        try:
            self.lists += 1
            entries = dict(await loader())
        except BaseException as exc:
            folder.error = exc if isinstance(exc, Exception) else None
            folder.loading.set()
            folder.loading = None
            raise
        self._install(folder, entries, started)
        folder.loading.set()
        folder.loading = None
        return entries

    def prime(self, path: str, entries: dict[str, E], started: float) -> None:
        """A listing of ``path`` that somebody else made (the mount's start-up LIST), begun at
        ``started`` on this cache's clock; kept like a loaded one unless a fresher is there."""
        folder = self._folder(path)
        if folder.loading is not None or (self._fresh(folder) and folder.started >= started):
            return
        self._install(folder, entries, started)

    @staticmethod
    def _install(folder: _Folder[E], entries: dict[str, E], started: float) -> None:
        """Keep ``entries`` (a LIST begun at ``started``) as the folder's listing, with our own
        edits made since that LIST began laid over it; older edits are in it already."""
        folder.edits = {n: e for n, e in folder.edits.items() if e[0] >= started}
        for name, (_, entry) in folder.edits.items():
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        folder.entries = entries
        folder.started = started

    def set_entry(self, path: str, name: str, entry: E | None) -> None:
        """Our own change: ``name`` in folder ``path`` is now ``entry`` (None: removed)."""
        folder = self._folder(path)
        folder.edits[name] = (self._clock(), entry)
        if folder.entries is not None:
            if entry is None:
                folder.entries.pop(name, None)
            else:
                folder.entries[name] = entry

    def invalidate(self, path: str) -> None:
        """Forget the listing of ``path`` (the next ``get`` issues a LIST); edits are kept."""
        folder = self._folders.get(path)
        if folder is not None:
            folder.entries = None

    def invalidate_below(self, path: str) -> None:
        """Forget the listings of ``path`` and of every folder inside it."""
        for p, folder in self._folders.items():
            if p == path or (p.startswith(path + "/") if path else True):
                folder.entries = None
