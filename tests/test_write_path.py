"""Write-side costs of the file system in-process: what a create, mkdir or rsync-style
close/utimes/rename asks of the store and the disk (the env fixture of test_fs_ops)."""

from __future__ import annotations

from tests.test_fs_ops import FS, env  # noqa: F401 -- env is a fixture used by name


async def test_a_new_folder_costs_no_list(env: FS) -> None:  # noqa: F811
    """mkdir knows the new folder is empty: lookups in it (rsync, cp -r) need no LIST."""
    await env.mkdir("new")
    lists = env.ops.listings.lists
    assert not await env.exists("new/a")
    await env.write_file("new/a", b"x")
    await env.mkdir("new/sub")
    assert not await env.exists("new/sub/b")
    assert sorted(await env.listdir("new")) == ["a", "sub"]
    assert await env.listdir("new/sub") == {}
    assert env.ops.listings.lists == lists
    await env.sync()
    env.ops.listings.invalidate("new")
    assert sorted(await env.listdir("new")) == ["a", "sub"]
    assert await env.read_file("new/a") == b"x"
