"""The sender's running estimates for `codec = "auto"`: its link to the receiver and its own
quantization speed, as exponentially weighted moving averages of what it measured.

Throughput comes from transfers of at least MIN_TRANSFER_BYTES (below that the round trip
dominates and the rate says little), with the round trip taken out; the round trip comes from
small calls (Info, HasCard, a probe's reply). Before any transfer the sender probes once
(InfoService.Probe with PROBE_BYTES of random bytes), and again, off the request path, when
its throughput estimate is older than REPROBE_S (links change; text handoffs are too small to
update it).
"""
from __future__ import annotations

import threading
import time

ALPHA = 0.3  # weight of the newest sample
MIN_TRANSFER_BYTES = 256 << 10
PROBE_BYTES = 1 << 20
REPROBE_S = 60.0


class Ewma:
    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha
        self.value: float | None = None  # None: no sample yet
        self._lock = threading.Lock()

    def update(self, sample: float) -> float:
        with self._lock:
            value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value
            self.value = value
            return value


class LinkEstimate:
    """Throughput (bytes/s) and round-trip time (s) from the sender to its receiver."""

    def __init__(self) -> None:
        self.throughput, self.rtt_s = Ewma(), Ewma()
        self.updated = 0.0  # time.monotonic() of the last throughput sample

    def stale(self) -> bool:
        return time.monotonic() - self.updated > REPROBE_S

    @property
    def known(self) -> bool:
        return self.throughput.value is not None and self.rtt_s.value is not None

    def observe_rtt(self, seconds: float) -> None:
        self.rtt_s.update(seconds)

    def observe_transfer(self, nbytes: int, seconds: float, force: bool = False) -> None:
        """A transfer of `nbytes` that took `seconds` (call to reply); `force` for a probe, which is
        smaller than MIN_TRANSFER_BYTES on purpose."""
        if nbytes < MIN_TRANSFER_BYTES and not force:
            return
        on_wire = max(seconds - (self.rtt_s.value or 0.0), seconds / 10, 1e-6)
        self.throughput.update(nbytes / on_wire)
        self.updated = time.monotonic()


class Rates:
    """Per-codec rates (fp16 KV bytes per second) of the sender's own quantization."""

    def __init__(self) -> None:
        self._rates: dict[str, Ewma] = {}
        self._lock = threading.Lock()

    def observe(self, codec: str, fp16_bytes: int, seconds: float) -> float:
        """The codec's rate with this sample in."""
        with self._lock:
            rate = self._rates.setdefault(codec, Ewma())
        return rate.update(fp16_bytes / max(seconds, 1e-6))

    def get(self, codec: str) -> float | None:
        rate = self._rates.get(codec)
        return rate.value if rate else None
