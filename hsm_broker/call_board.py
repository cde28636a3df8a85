"""What each worker is doing, in memory the supervisor shares with its workers: no message per call.

Workers take calls from the frontend directly, so the supervisor no longer sees them go by. It still has to
kill a worker stuck in a call and report how busy the workers are; for that each worker writes, in its own
row of an anonymous shared mapping made before any worker is forked, when its current call started, until
when that call may run, how long it has been busy in total, and when it last went round its loop (at least
once a second when idle: a worker frozen or hung between calls stops doing so). Writing a row is a few
stores in this process's memory: no system call, no wake-up of the supervisor.

A worker writes the deadline before the start and clears the start when done, and the supervisor reads the
start before the deadline, so a row read as busy always carries that call's deadline (x86-64 and arm64 keep
stores and loads of one thread in order for these aligned 8-byte fields; a torn read could only delay a kill
by one loop turn). The rows are not protected from each other: a subverted worker could make the supervisor
kill its siblings, which is less than what it can do with the token session it already holds.
"""

import math
import mmap
import struct

# started (monotonic s, 0 = idle), deadline (monotonic s), busy total (us), last loop turn (monotonic s; +inf
# while in a login, which has no bound of its own)
_ROW = struct.Struct("=ddQd")
_ALIVE = struct.Struct("=d")
_ALIVE_OFFSET = 24


class CallBoard:
    def __init__(self, slots: int) -> None:
        self._map = mmap.mmap(-1, _ROW.size * slots)  # MAP_SHARED | MAP_ANONYMOUS: inherited by fork

    def _read(self, slot: int) -> tuple[float, float, int]:
        started, deadline, busy_us, _ = _ROW.unpack_from(self._map, slot * _ROW.size)
        return started, deadline, busy_us

    def _alive(self, slot: int) -> float:
        alive: float = _ALIVE.unpack_from(self._map, slot * _ROW.size + _ALIVE_OFFSET)[0]
        return alive

    # -- the worker's side: its own row only ---------------------------------------------------------

    def begin(self, slot: int, now: float, deadline: float) -> None:
        _, _, busy_us = self._read(slot)
        _ROW.pack_into(self._map, slot * _ROW.size, 0.0, deadline, busy_us, now)
        _ROW.pack_into(self._map, slot * _ROW.size, now, deadline, busy_us, now)

    def end(self, slot: int, now: float) -> None:
        started, deadline, busy_us = self._read(slot)
        spent = max(0, round((now - started) * 1_000_000)) if started else 0
        _ROW.pack_into(self._map, slot * _ROW.size, 0.0, deadline, busy_us + spent, now)

    def beat(self, slot: int, now: float) -> None:
        """Another turn of the worker's loop (`now`), or math.inf on entering a login."""
        _ALIVE.pack_into(self._map, slot * _ROW.size + _ALIVE_OFFSET, now)

    # -- the supervisor's side -----------------------------------------------------------------------

    def overrun(self, slot: int, now: float) -> float:
        """Seconds the call in progress has run past its deadline (0 when idle or within it)."""
        started, deadline, _ = self._read(slot)
        if not started or not math.isfinite(deadline):
            return 0.0
        return max(0.0, now - deadline)

    def silent(self, slot: int, now: float) -> float:
        """Seconds since the worker last went round its loop (0 while in a call or a login)."""
        alive = self._alive(slot)
        if self._read(slot)[0] or not alive < now:  # in a call (overrun judges it), a login, or garbage
            return 0.0
        return now - alive

    def busy(self, slot: int) -> bool:
        return bool(self._read(slot)[0])

    def busy_us(self, slot: int, now: float) -> int:
        """Time spent on calls, the one in progress counted up to now (so the total never goes down)."""
        started, _, busy_us = self._read(slot)
        running = max(0, round((now - started) * 1_000_000)) if started and math.isfinite(started) else 0
        return busy_us + running

    def clear(self, slot: int, now: float) -> None:
        """A new worker starts with a blank row, alive as of `now` (its predecessor's total is the
        supervisor's to keep)."""
        _ROW.pack_into(self._map, slot * _ROW.size, 0.0, 0.0, 0, now)
