"""StoreClient: how the ingress and the style replicas call the job store, so that its death is survivable.

Every call waits at most `timeout_s`. While Ray restarts a dead store the call waits (the actor is
created with `max_task_retries=-1`, so Ray re-sends it to the new process); past the timeout it is
`StoreUnavailable`, a 503 with Retry-After, which only the style routes can raise: /classify never
calls the store. A store killed for good (restarts exhausted, `ray.kill(no_restart=True)`) is created
again under its name by the next call, and reads its jobs back from its directory.
"""
from __future__ import annotations

import asyncio
import logging

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from serve.errors import Unavailable
from serve.job_store import get_or_create_store

log = logging.getLogger("ray.serve")


class StoreUnavailable(Unavailable):
    """503: the job store did not answer in time (restarting, or gone)."""


async def _awaited(ref):
    return await ref


class StoreClient:
    """A job-store actor handle with bounded waits, re-created when the actor is dead for good."""

    def __init__(self, store_args: dict, timeout_s: float = 5.0, retry_after: int = 5):
        self.args, self.timeout_s, self.retry_after = dict(store_args), timeout_s, retry_after
        self.actor = get_or_create_store(**self.args)

    def _unavailable(self, why: str) -> StoreUnavailable:
        return StoreUnavailable(f"job store unavailable ({why}); style routes answer again once it is back, "
                                f"retry shortly", retry_after=self.retry_after)

    async def call(self, method: str, *args, timeout_s: float | None = None, **kwargs):
        """`await store.<method>(*args)` from an event loop; StoreUnavailable past the timeout."""
        for again in (True, False):
            try:
                ref = getattr(self.actor, method).remote(*args, **kwargs)
                return await asyncio.wait_for(_awaited(ref), timeout_s or self.timeout_s)
            except asyncio.TimeoutError:
                raise self._unavailable(f"no answer within {timeout_s or self.timeout_s:g} s") from None
            except ActorDiedError:
                if not again:
                    raise self._unavailable("its actor died") from None
                log.warning("job store %s is dead; creating it again from %s", self.args["name"],
                            self.args.get("directory"))
                self.actor = await asyncio.to_thread(get_or_create_store, **self.args)
            except RayActorError as e:  # ActorUnavailableError: restarting, or the network
                raise self._unavailable(type(e).__name__) from None

    def recreate(self) -> None:
        """A new handle (and a new actor, reading its directory) after ActorDiedError."""
        self.actor = get_or_create_store(**self.args)

    def call_sync(self, method: str, *args, timeout_s: float | None = None, **kwargs):
        """The same from a worker thread (ray.get)."""
        for again in (True, False):
            try:
                return ray.get(getattr(self.actor, method).remote(*args, **kwargs),
                               timeout=timeout_s or self.timeout_s)
            except GetTimeoutError:
                raise self._unavailable(f"no answer within {timeout_s or self.timeout_s:g} s") from None
            except ActorDiedError:
                if not again:
                    raise self._unavailable("its actor died") from None
                self.actor = get_or_create_store(**self.args)
            except RayActorError as e:
                raise self._unavailable(type(e).__name__) from None
