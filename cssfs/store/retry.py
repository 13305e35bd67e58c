"""store.retry: the one place a store operation is tried again after a transient failure.

Exponential backoff with full jitter (sleep a uniform time in ``[0, min(max_delay,
base_delay * 2**n))``), bounded by a number of attempts and a time budget. Each failure is logged
at DEBUG, then INFO, then WARNING as they accumulate; when the attempts or the budget run out the
caller gets ``StoreUnavailableError`` naming the operation and the object. Upper layers never
retry. Knows: trio, time, logging. Must not know: boto3, HTTP, what the operation does.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from cssfs.errors import StoreUnavailableError

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "TransientError", "retrying"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all, and no new attempt once ``budget`` seconds have
    passed since the first one began (or would pass during the backoff sleep)."""

    attempts: int = 6
    budget: float = 20.0
    base_delay: float = 0.25
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.budget < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy {self}")

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Full jitter: the sleep before attempt ``failures + 1``."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (failures - 1)))
        return rng.uniform(0.0, ceiling)


DEFAULT_RETRY = RetryPolicy()


class TransientError(Exception):
    """Raised by an attempt to say "this may work if tried again"; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _level(failures: int) -> int:
    if failures <= 1:
        return logging.DEBUG
    if failures <= 3:
        return logging.INFO
    return logging.WARNING


async def retrying(
    policy: RetryPolicy,
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    rng: random.Random,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Await ``attempt()`` until it returns, raises something other than ``TransientError``, or
    the policy is spent (``StoreUnavailableError("<what>: ...")``). ``what`` names the operation
    and the object, e.g. ``"GET s3://bucket/key"``."""
    started = trio.current_time()
    failures = 0
    while True:
        try:
            return await attempt()
        except TransientError as exc:
            failures += 1
            elapsed = trio.current_time() - started
            delay = policy.backoff(failures, rng)
            if failures >= policy.attempts or elapsed + delay > policy.budget:
                raise StoreUnavailableError(
                    f"{what}: store unavailable, gave up after {failures} attempt"
                    f"{'s' if failures != 1 else ''} in {elapsed:.1f} s ({exc.reason})"
                ) from exc
            log.log(
                _level(failures),
                "%s: attempt %d failed (%s); retrying in %.2f s",
                what,
                failures,
                exc.reason,
                delay,
            )
            if on_retry is not None:
                on_retry()
            await trio.sleep(delay)
