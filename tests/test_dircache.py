"""DirCache refresh-ahead: a listing in active use is loaded again before it expires, while
callers keep getting the current one; our edits made meanwhile survive the new LIST."""

from __future__ import annotations

import trio
import trio.testing

from cssfs.dircache import DirCache


async def test_refresh_ahead_keeps_serving_the_current_listing() -> None:
    now = [0.0]
    cache: DirCache[int] = DirCache(2.0, clock=lambda: now[0])
    version = [1]
    gate = trio.Event()
    gate.set()

    async def loader() -> dict[str, int]:
        await gate.wait()
        return {"a": version[0]}

    assert await cache.get("d", loader) == {"a": 1}
    assert not cache.due("d", 0.75)  # young
    now[0] = 1.6
    assert cache.due("d", 0.75)
    assert not cache.due("other", 0.75)  # never listed
    version[0] = 2
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        assert not cache.loading("d")
        nursery.start_soon(cache.refresh, "d", loader)
        await trio.testing.wait_all_tasks_blocked()
        assert cache.loading("d") and not cache.loading("other")
        assert not cache.due("d", 0.75)  # a load runs: not twice
        assert await cache.get("d", loader) == {"a": 1}  # meanwhile: the current listing
        cache.set_entry("d", "new", 3)  # our change while the LIST runs
        gate.set()
    assert cache.lists == 2 and not cache.loading("d")
    now[0] = 3.0  # past the first listing's ttl, within the refreshed one's
    assert await cache.get("d", loader) == {"a": 2, "new": 3}
    assert cache.lists == 2


async def test_refresh_of_an_expired_or_unknown_listing_does_nothing() -> None:
    now = [0.0]
    cache: DirCache[int] = DirCache(2.0, clock=lambda: now[0])

    async def loader() -> dict[str, int]:
        return {"a": 1}

    await cache.refresh("d", loader)  # never listed
    await cache.get("d", loader)
    now[0] = 5.0
    assert not cache.due("d", 0.75)  # expired: the next get loads it
    await cache.refresh("d", loader)
    assert cache.lists == 1
