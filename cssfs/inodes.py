"""inodes: the inode <-> path table of the mount, with lookup and open counts.

What it knows: paths inside the mount (``""`` is the root, ``"a/b"`` a file or folder below it;
no leading or trailing slash), inode numbers, the kernel's lookup counts and our open counts.
What it must not know: stores, envelopes, pyfuse3 (it is plain data, so fs.py's tests and
this module's stay cheap).

The rules (pyfuse3's ``lookup_counts`` developer note and its tmpfs example):

- An inode number, once handed to the kernel, names the same node until the kernel forgets it:
  ``lookup`` (and every readdirplus entry the kernel accepts) adds one to the lookup count,
  ``forget`` subtracts. A node is dropped only when both its lookup count and its open count
  reach zero; a rename moves the node (and every node below a renamed folder) to the new path.
- An unlinked (or renamed-over) node leaves the path map at once but lives on, detached, until
  it is forgotten and closed, so a file that is still open can be read and written to the end.
- Inode numbers are never reused within one mount.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ROOT_INODE = 1


def join(parent: str, name: str) -> str:
    """The path of ``name`` inside the folder ``parent``."""
    return f"{parent}/{name}" if parent else name


def split(path: str) -> tuple[str, str]:
    """``(parent, name)`` of a non-root path."""
    parent, _, name = path.rpartition("/")
    return parent, name


def is_below(path: str, folder: str) -> bool:
    """True if ``path`` lies strictly inside ``folder`` ("" is the root)."""
    return path.startswith(folder + "/") if folder else path != ""


@dataclass(eq=False)
class Node:
    """One inode: where it is, what it is, and who still holds it.

    ``state`` is a slot for the file layer (fs.py keeps the open file's staged contents and
    pending attributes there); this module never looks inside it.
    """

    inode: int
    path: str
    is_dir: bool
    lookups: int = 0
    opens: int = 0
    detached: bool = False
    state: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return split(self.path)[1]

    @property
    def parent_path(self) -> str:
        return split(self.path)[0]


class InodeTable:
    """The mount's nodes by inode number and by path."""

    def __init__(self) -> None:
        root = Node(ROOT_INODE, "", True, lookups=1)
        self._by_inode: dict[int, Node] = {ROOT_INODE: root}
        self._by_path: dict[str, Node] = {"": root}
        self._children: dict[str, dict[str, Node]] = {}  # folder path -> name -> node
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_inode)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._by_inode.values()))

    @property
    def root(self) -> Node:
        return self._by_inode[ROOT_INODE]

    def get(self, inode: int) -> Node:
        """The node for ``inode``; KeyError if the kernel names an inode we never gave it."""
        return self._by_inode[inode]

    def at(self, path: str) -> Node | None:
        """The attached node at ``path``, if the kernel knows one."""
        return self._by_path.get(path)

    def below(self, folder: str) -> list[Node]:
        """Attached nodes strictly inside ``folder`` (any depth).

        O(folders with attached children), not O(nodes): every rename and unlink asks this of
        its target, which is usually a plain file with nothing below it. The folders are taken
        from ``_children``'s keys rather than walked from ``folder`` down, so a node whose
        parent folder has no node of its own is still found.
        """
        return [
            node
            for parent, kids in self._children.items()
            if parent == folder or is_below(parent, folder)
            for node in kids.values()
        ]

    def children(self, folder: str) -> list[Node]:
        """Attached nodes directly inside ``folder``."""
        return list(self._children.get(folder, {}).values())

    def _attach(self, node: Node) -> None:
        self._by_path[node.path] = node
        if node.path:
            parent, name = split(node.path)
            self._children.setdefault(parent, {})[name] = node

    def _unattach(self, path: str) -> Node | None:
        node = self._by_path.pop(path, None)
        if node is not None and path:
            parent, name = split(path)
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.pop(name, None)
                if not siblings:
                    del self._children[parent]
        return node

    def node_for(self, path: str, is_dir: bool) -> Node:
        """The node at ``path`` (created if new), without touching its lookup count.

        A node of the other kind at the same path (another client replaced a file by a folder)
        is detached first, so the kernel sees a new inode.
        """
        node = self._by_path.get(path)
        if node is not None and node.is_dir != is_dir:
            self.detach(path)
            node = None
        if node is None:
            node = Node(self._next, path, is_dir)
            self._next += 1
            self._by_inode[node.inode] = node
            self._attach(node)
        return node

    def lookup(self, path: str, is_dir: bool) -> Node:
        """``node_for`` plus one kernel lookup reference (lookup, create, mkdir, readdirplus)."""
        node = self.node_for(path, is_dir)
        node.lookups += 1
        return node

    def forget(self, inode: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references; drop the node once nothing holds it."""
        node = self._by_inode.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - nlookup)
        self._maybe_drop(node)

    def drop_if_unused(self, node: Node) -> None:
        """Drop a node made by ``node_for`` that the kernel did not take after all."""
        self._maybe_drop(node)

    def opened(self, node: Node) -> None:
        node.opens += 1

    def closed(self, node: Node) -> None:
        node.opens = max(0, node.opens - 1)
        self._maybe_drop(node)

    def detach(self, path: str) -> Node | None:
        """Take the node at ``path`` (and nodes below it) out of the path map (unlink, rmdir).

        Detached nodes keep their inode until forgotten and closed.
        """
        node = self._unattach(path)
        victims = [node] if node is not None else []
        if node is None or node.is_dir:
            below = [n.path for n in self.below(path)]
            victims += [n for n in map(self._unattach, below) if n is not None]
        for victim in victims:
            victim.detached = True
            self._maybe_drop(victim)
        return node

    def move(self, old: str, new: str) -> None:
        """Rename: the node at ``old`` (and every node below it) now lives at ``new``.

        Whatever was attached at ``new`` (or below it) is detached first.
        """
        if old == new:
            return
        self.detach(new)
        node = self._by_path.get(old)
        paths = [old] if node is not None else []
        if node is None or node.is_dir:
            paths += [n.path for n in self.below(old)]
        moving = [n for n in map(self._unattach, paths) if n is not None]
        for n in moving:
            n.path = new + n.path[len(old) :]
            self._attach(n)

    def _maybe_drop(self, node: Node) -> None:
        if node.inode == ROOT_INODE or node.lookups > 0 or node.opens > 0:
            return
        self._by_inode.pop(node.inode, None)
        if self._by_path.get(node.path) is node:
            self._unattach(node.path)
