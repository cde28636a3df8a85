"""Which key_ids Decrypt accepts (frontend/key_set.py), row by row against a fake broker client: the rules
docs/architecture.md states, in its order."""

import asyncio
from dataclasses import dataclass, field

import pytest

from keysealer.frontend.key_set import BrokerKeySet
from keysealer.shared.broker_stats import BrokerStats
from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.ipc_schema import MAX_KEY_IDS_REPORTED, HealthResult, WorkerHealth

OLD, NEW, STRANGER = ("ks1-" + c * 32 for c in "abc")
MANY = tuple(f"ks1-{i:032x}" for i in range(MAX_KEY_IDS_REPORTED))
READY, STARTING = WorkerHealth("ready", ""), WorkerHealth("starting", "logging in")
UNHEALTHY = "broker unreachable"


def health(*key_ids: str, workers: tuple[WorkerHealth, ...] = (READY,)) -> HealthResult:
    return HealthResult(1, key_ids[0] if key_ids else "", key_ids, workers, BrokerStats())


@dataclass
class FakeBroker:
    """Answers health with `answer` (or raises it), counting the asks."""

    answer: HealthResult | Exception
    connected: bool = True
    asks: list[float] = field(default_factory=list)

    async def health(self, timeout: float) -> HealthResult:
        self.asks.append(timeout)
        await asyncio.sleep(0)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@dataclass(frozen=True)
class Row:
    learnt: HealthResult | None  # what the last probe gave the key set
    answer: HealthResult | Exception  # what the broker answers when asked again
    key_id: str
    outcome: bool | str  # accepted / refused as unknown / "unavailable"
    asks: int  # health requests the lookup cost
    connected: bool = True
    max_age: float = 30.0


ROWS = {
    "an id in the key set": Row(health(OLD), health(OLD), OLD, True, 0),
    "a new id right after a probe (rotation): asked again at once, then accepted":
        Row(health(OLD), health(NEW, OLD), NEW, True, 1),
    "an id the broker does not hold, key set fresh": Row(health(OLD), health(OLD), STRANGER, False, 1),
    "an id missing from a cut list: the broker decides": Row(health(*MANY), health(*MANY), STRANGER, True, 1),
    "not connected: cannot vouch": Row(health(OLD), health(OLD), STRANGER, "unavailable", 1, connected=False),
    "not connected, cut list: still cannot vouch":
        Row(health(*MANY), health(*MANY), STRANGER, "unavailable", 1, connected=False),
    "a stale key set and the broker not answering": Row(health(OLD), TimeoutError(), STRANGER, "unavailable", 1,
                                                        max_age=0.0),
    "no ready worker ever: nothing to vouch for":
        Row(None, health(workers=(STARTING,)), STRANGER, "unavailable", 1),
    "a key set from no ready worker is not taken":
        Row(health(OLD, workers=(STARTING,)), health(OLD, workers=(STARTING,)), OLD, "unavailable", 1),
    "a known id while disconnected is still accepted": Row(health(OLD), health(OLD), OLD, True, 0, connected=False),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_which_key_ids_decrypt_accepts(row: Row) -> None:
    async def look_up() -> bool:
        broker = FakeBroker(row.answer, row.connected)
        keys = BrokerKeySet(broker, row.max_age, 1.0, lambda: UNHEALTHY)
        if row.learnt is not None:
            keys.learn(row.learnt)
        try:
            return await keys.accepts(row.key_id)
        finally:
            assert len(broker.asks) == row.asks

    if row.outcome == "unavailable":
        with pytest.raises(KeySealerError) as raised:
            asyncio.run(look_up())
        assert raised.value.code is ErrorCode.TOKEN_UNAVAILABLE
        assert raised.value.message == f"cannot check the key_id: {UNHEALTHY}"
    else:
        assert asyncio.run(look_up()) is row.outcome


def test_unknown_ids_cost_one_ask_a_second_however_many_callers() -> None:
    async def flood() -> tuple[list[bool], int]:
        broker = FakeBroker(health(OLD))
        keys = BrokerKeySet(broker, 30.0, 1.0, lambda: UNHEALTHY)
        keys.learn(health(OLD))
        results = await asyncio.gather(*(keys.accepts(f"ks1-{i:032x}") for i in range(50)))
        results.append(await keys.accepts(STRANGER))  # after the coalesced ask, within the second
        return results, len(broker.asks)

    results, asks = asyncio.run(flood())
    assert results == [False] * 51 and asks == 1
