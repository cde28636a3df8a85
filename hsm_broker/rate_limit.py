"""A token bucket: at most `rate` events a second, in bursts of at most `rate`."""

import time
from dataclasses import dataclass, field


@dataclass
class RateLimit:
    rate: float
    _tokens: float = field(init=False)
    _at: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self) -> None:
        self._tokens = self.rate

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
