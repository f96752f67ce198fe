"""DecisionTrigger: wait in the triggerer for a new A/B decision sent to the app."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
from airflow.triggers.base import BaseTrigger, TriggerEvent

from ..hooks.app import AppHook
from ..waiting import MIN_DEFER_SECONDS


class DecisionTrigger(BaseTrigger):
    """Polls ``GET /rollout/decisions`` (asynchronously, never blocking the triggerer's loop) until a
    decision for ``new_version`` newer than ``after_id`` exists, or ``deadline`` passes.

    Yields ``{"status": "decision"}`` or ``{"status": "timeout"}``, never raises: a failed poll is
    logged and retried (the app may be restarting), and the task decides what an event means. It
    fires no sooner than ``MIN_DEFER_SECONDS`` after it was made (see ``waiting``).
    """

    def __init__(self, new_version: str, after_id: int, deadline: float, poll_interval: float = 2.0,
                 not_before: float | None = None, app_conn_id: str = AppHook.default_conn_name):
        super().__init__()
        self.new_version, self.after_id = new_version, after_id
        self.deadline, self.poll_interval, self.app_conn_id = deadline, poll_interval, app_conn_id
        self.not_before = not_before if not_before is not None else time.time() + MIN_DEFER_SECONDS

    def serialize(self) -> tuple[str, dict]:
        # The connection's id, never its token: triggers are stored in Airflow's database.
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"new_version": self.new_version, "after_id": self.after_id, "deadline": self.deadline,
                 "poll_interval": self.poll_interval, "not_before": self.not_before, "app_conn_id": self.app_conn_id})

    async def _new_decisions(self, client: httpx.AsyncClient) -> bool:
        app = await AppHook(self.app_conn_id).aendpoint()
        reply = await client.get(f"{app.url}/rollout/decisions", params={"new_version": self.new_version},
                                 headers=app.headers)
        reply.raise_for_status()
        return any(d["id"] > self.after_id for d in reply.json())

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                status = "timeout" if time.time() >= self.deadline else None
                if status is None:
                    try:
                        status = "decision" if await self._new_decisions(client) else None
                    except (httpx.HTTPError, ValueError) as exc:
                        self.log.warning("could not read the decisions (retrying): %s", exc)
                if status:
                    await asyncio.sleep(max(0.0, self.not_before - time.time()))
                    yield TriggerEvent({"status": status})
                    return
                await asyncio.sleep(self.poll_interval)
