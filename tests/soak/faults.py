"""The soak's faults, one every `every` seconds, in turn, and what each measured.

- `terminate_listeners`: pg_terminate_backend of every broker's listening connection.
- `postgres_restart`: PostgreSQL stopped (fast) for 3 s, then started; the listener-return
  time of each broker is measured from the moment the server accepts connections again to the
  moment that broker's listener has reconnected and backfilled.
- `kill_broker`: SIGKILL of one broker (in turn), restarted on the same port at once. In the
  wal soak (`--capture wal`, brokers on a bus) the relay: the slot's reader.
- `stall_client`: one global client stops reading for 20 s; the broker must cut it or carry
  it, and it must come back exact either way. Through nginx it is carried: 20 s of a global
  stream (~2.5 MB) fit in the kernel's socket buffers between nginx and the client and
  between the broker and nginx (autotuned up to tcp_wmem/tcp_rmem's maximum, 4 and 32 MB
  here), so the broker's queue never fills.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.soak.clients import Client
from tests.soak.cluster import Cluster
from tests.support.probes import FirstSuccess
from tests.support.processes import BrokerProcess

OUTAGE_SECONDS = 3.0
STALL_SECONDS = 20.0


@dataclass
class Faults:
    cluster: Cluster
    stall_candidates: list[Client]
    rng: random.Random
    log: list[dict[str, Any]] = field(default_factory=list)
    listener_returns: list[float] = field(default_factory=list)  # after PostgreSQL returns
    kills: int = 0
    stalled: set[int] = field(default_factory=set)  # client indexes

    async def run(self, first_at: float, every: float, until: float, started: float) -> None:
        """Inject faults at `first_at`, `first_at + every`, ... (seconds after `started`),
        as long as one can begin before `until`; each is awaited to its end."""
        cycle = [
            self.terminate_listeners,
            self.postgres_restart,
            self.kill_broker,
            self.stall_client,
        ]
        at = first_at
        for n in range(10_000):
            if max(at, time.monotonic() - started) >= until:
                return
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            fault = cycle[n % len(cycle)]
            began = time.monotonic()
            details = await fault()
            entry = {"fault": fault.__name__, "at_s": round(began - started, 1), **details}
            entry["lasted_s"] = round(time.monotonic() - began, 2)
            self.log.append(entry)
            print(f"soak: fault {entry}", flush=True)
            at += every

    async def terminate_listeners(self) -> dict[str, Any]:
        before = [self._reconnects(b) for b in self.cluster.brokers]
        began = time.monotonic()
        terminated = await asyncio.to_thread(self.cluster.terminate_listeners)
        backs = await self._listeners_back(before)
        return {"terminated": terminated, "listener_back_s": [_since(began, t) for t in backs]}

    async def postgres_restart(self) -> dict[str, Any]:
        database = self.cluster.database
        assert database is not None
        before = [self._reconnects(b) for b in self.cluster.brokers]
        await asyncio.to_thread(database.stop, "fast")
        await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself
        accepting = FirstSuccess(self.cluster.accepts_connections)
        accepting.start()
        waiting = asyncio.ensure_future(self._listeners_back(before))
        await asyncio.to_thread(database.start)
        await asyncio.to_thread(accepting.join, 30)
        backs = [_since(accepting.at, t) for t in await waiting]
        self.listener_returns.extend(backs)
        return {"outage_s": OUTAGE_SECONDS, "listener_back_s": backs}

    async def kill_broker(self) -> dict[str, Any]:
        index = self.kills % len(self.cluster.brokers)
        if self.cluster.redis is not None:  # the wal soak: kill the slot's reader, the relay
            index = next(
                (n for n, b in enumerate(self.cluster.brokers) if _role(b) == "relay"), index
            )
        self.kills += 1
        ready = await asyncio.to_thread(self.cluster.kill_and_restart, index)
        return {"broker": index, "restarted_ready_s": round(ready, 3)}

    async def stall_client(self) -> dict[str, Any]:
        client = self.rng.choice(self.stall_candidates)
        self.stalled.add(client.index)
        connects = client.record.connects
        await client.stall(STALL_SECONDS)
        return {"client": client.index, "stalled_s": STALL_SECONDS, "connects_before": connects}

    async def _listeners_back(self, before: list[int]) -> list[float]:
        """When each broker's listener had reconnected (more reconnects than `before`) and
        was up again, its backfill done; 0.0 for one that did not within 60 s. On a bus
        (the wal soak) one time for all: when a relay (any broker) listens again, after none
        did, and every broker is ready."""
        if self.cluster.redis is not None:
            gone = FirstSuccess(lambda: not _relay_listening(self.cluster.brokers), timeout=10)
            gone.start()
            await asyncio.to_thread(gone.join, 15)
            back = FirstSuccess(lambda: _relay_back(self.cluster.brokers), timeout=60)
            back.start()
            await asyncio.to_thread(back.join, 70)
            return [back.at]
        probes = [
            FirstSuccess(_reconnected(broker, count), timeout=60)
            for broker, count in zip(self.cluster.brokers, before, strict=True)
        ]
        for probe in probes:
            probe.start()
        for probe in probes:
            await asyncio.to_thread(probe.join, 70)
        return [probe.at for probe in probes]

    @staticmethod
    def _reconnects(broker: BrokerProcess) -> int:
        return int(broker.stats()["listener"]["reconnects"])


def _reconnected(broker: BrokerProcess, before: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            listener = broker.stats()["listener"]
        except (OSError, AssertionError, ValueError):  # down, restarting, or not answering
            return False
        return bool(listener["connected"]) and int(listener["reconnects"]) > before

    return check


def _role(broker: BrokerProcess) -> str | None:
    try:
        role = broker.stats()["bus"]["role"]
    except (OSError, AssertionError, ValueError, KeyError, TypeError):
        return None
    return str(role)


def _relay_listening(brokers: list[BrokerProcess]) -> bool:
    try:
        return any(broker.stats()["listener"]["connected"] for broker in brokers)
    except (OSError, AssertionError, ValueError):
        return False


def _relay_back(brokers: list[BrokerProcess]) -> bool:
    try:
        return _relay_listening(brokers) and all(broker.ready() for broker in brokers)
    except (OSError, RuntimeError):
        return False


def _since(start: float, at: float) -> float:
    return round(at - start, 3) if at else float("inf")
