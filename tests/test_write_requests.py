"""What writing a new tree through a real mount asks of the store, counted (`cssfs status`).

rsync and cp -r make a folder, then look up names in it and create files there. A folder this
mount just made is known to be empty and to hold no sharing policy, so those lookups and the
recipient lookups of the new files need no LIST and no HEAD until the listing TTL runs out; the
folder's attrs record is created with one conditional PUT, nothing read first.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.mounting import cmp_trees, fuse_test_marker, make_identity, mounted, run

pytestmark = fuse_test_marker()


def _store_and_identity(tmp_path: Path) -> tuple[Path, Path]:
    """An empty local store folder and a fresh identity file for one test's mounts."""
    store = tmp_path / "store"
    store.mkdir()
    identity = tmp_path / "identity"
    make_identity(identity)
    return store, identity


def test_new_folders_need_no_list_and_no_head(tmp_path: Path) -> None:
    store, identity = _store_and_identity(tmp_path)
    src = tmp_path / "src"
    for rel in ("a.txt", "d/b.txt", "d/e/c.txt", "d/e/f/g.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode() * 100)
    with mounted(os.fspath(store), tmp_path / "mnt", identity,
                 args=["--list-ttl", "30"]) as m:
        m.path("first").write_bytes(b"1")  # the root's listing and policy are looked up here
        run("mkdir", m.path("new"))  # a marker PUT
        before = m.status()["store_requests"]
        run("rsync", "-a", f"{src}/", f"{m.path('new')}/")
        m.sync()
        after = m.status()["store_requests"]
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        assert delta.get("list", 0) == 0, delta
        assert delta.get("head", 0) == 0, delta
        assert delta.get("put", 0) >= 4 + 3  # the four files and three folder markers
        cmp_trees(src, m.path("new"))


def test_a_listed_folder_needs_no_policy_head(tmp_path: Path) -> None:
    """A folder listed (ls) shows whether it has a policy object: a file created in it next
    needs no policy HEAD, for it or for the root (listed when mounting)."""
    store, identity = _store_and_identity(tmp_path)
    with mounted(os.fspath(store), tmp_path / "mnt", identity, args=["--list-ttl", "30"]) as m:
        run("mkdir", m.path("old"))
        m.path("old", "a").write_bytes(b"a")
        m.sync()
    with mounted(os.fspath(store), tmp_path / "mnt", identity, args=["--list-ttl", "30"]) as m:
        assert os.listdir(m.path("old")) == ["a"]
        before = m.status()["store_requests"]
        m.path("old", "b").write_bytes(b"b")
        m.sync()
        after = m.status()["store_requests"]
        assert after.get("head", 0) == before.get("head", 0), (before, after)
        assert m.path("old", "b").read_bytes() == b"b"


def test_with_no_listing_cache_new_folders_are_listed(tmp_path: Path) -> None:
    """The shortcut is the listing cache's: with a TTL of 0 every lookup LISTs as before."""
    store, identity = _store_and_identity(tmp_path)
    with mounted(os.fspath(store), tmp_path / "mnt", identity, args=["--list-ttl", "0"]) as m:
        run("mkdir", m.path("new"))
        before = m.status()["store_requests"]
        m.path("new", "x").write_bytes(b"x")
        assert m.status()["store_requests"].get("list", 0) > before.get("list", 0)
