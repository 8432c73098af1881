"""The services' log lines: as text, or as one JSON object per line (`--log-format json`) with
the structured fields a line carries (`extra={"fields": {...}}`: the access log's method, status,
milliseconds, tenant tag and refusal reason; the stats line's counts). And the periodic stats
line: what a service did since its last one, at INFO, every stats_interval_s."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry

log = logging.getLogger("qkvcomm.stats")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: int, form: str) -> None:
    """The root logger at `level`, its lines as `form` (text or json) on stderr."""
    if form not in ("text", "json"):
        raise ValueError(f"a log format is text or json, not {form!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


# what the stats line counts: (its field, the counters summed into it)
COUNTED = {
    "calls": ("qkvcomm_requests",), "cards": ("qkvcomm_cards_sent", "qkvcomm_cards_received"),
    "wire_bytes": ("qkvcomm_wire_bytes_sent", "qkvcomm_wire_bytes_received"), "refused": ("qkvcomm_errors",),
}


def totals(registry: CollectorRegistry) -> dict[str, float]:
    """The service's counters, summed as COUNTED says."""
    sums = dict.fromkeys(COUNTED, 0.0)
    for family in registry.collect():
        for field, names in COUNTED.items():
            if family.name in names:
                sums[field] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return sums


async def stats_lines(name: str, registry: CollectorRegistry, interval_s: float) -> None:
    """Every `interval_s`, a line of what the service did since the last one (none when idle)."""
    last, since = totals(registry), time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now, at = totals(registry), time.monotonic()
        delta = {k: now[k] - last[k] for k in now}
        if delta["calls"]:
            log.info("%s: %d calls in %.0f s (%d refused), %d cards, %.1f MB of card data", name, delta["calls"],
                     at - since, delta["refused"], delta["cards"], delta["wire_bytes"] / 1e6,
                     extra={"fields": {"service": name, "seconds": round(at - since, 1),
                                       **{k: int(v) for k, v in delta.items()}}})
        last, since = now, at
