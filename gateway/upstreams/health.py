"""Passive health of the upstreams, per process (as Envoy's outlier detection): ejection and cool-down.

* `eject_after_failures` consecutive failures (no connection, a 5xx, a read timeout or a
  dropped connection) eject an upstream for `eject_seconds`; then one request at a time probes it,
  and a success restores it (a failed probe ejects it again).
* A 429 cools the upstream down for as long as it says (`retry-after-ms`, `retry-after`, else its
  `x-ratelimit-reset-*`): no request is sent to it meanwhile. A 429 is no sign of sickness, so it
  neither ejects nor restores.

An ejected or cooling upstream is skipped without a connection attempt. `gateway_upstream_up`
says which upstreams are in rotation.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.config import UpstreamSettings
from gateway.telemetry.metrics import Metrics

Verdict = Literal["ok", "failure", "rate_limited", "neutral"]

_DEFAULT_COOL_SECONDS = 1.0
_MAX_COOL_SECONDS = 600.0
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(slots=True)
class _State:
    failures: int = 0
    ejected_until: float = 0.0
    cooling_until: float = 0.0
    probe_until: float = 0.0  # a probe is under way until it reports, or this passes (it was lost)


class Health:
    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._states: dict[str, _State] = {}

    def _state(self, name: str) -> _State:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = _State()
            self._metrics.upstream_up.labels(name).set(1)
        return state

    def admit(self, name: str, settings: UpstreamSettings) -> Literal["ok", "probe", "ejected", "cooling"]:
        """Whether a request may be sent to `name` now; `probe` takes the one probe slot."""
        state, now = self._state(name), self._clock()
        if now < state.cooling_until:
            return "cooling"
        if state.ejected_until == 0.0:
            return "ok"
        if now < state.ejected_until or now < state.probe_until:
            return "ejected"
        state.probe_until = now + settings.connect_timeout_seconds + settings.read_timeout_seconds
        return "probe"

    def record(
        self, name: str, settings: UpstreamSettings, verdict: Verdict, cool_seconds: float = 0
    ) -> None:
        """What one attempt at `name` showed."""
        state = self._state(name)
        state.probe_until = 0.0
        if verdict == "rate_limited":
            state.cooling_until = self._clock() + min(cool_seconds, _MAX_COOL_SECONDS)
        elif verdict == "ok":
            if state.ejected_until:  # back in rotation; the gauge is only written when it changes
                self._metrics.upstream_up.labels(name).set(1)
            state.failures, state.ejected_until = 0, 0.0
        elif verdict == "failure":
            state.failures += 1
            if state.failures >= settings.eject_after_failures:
                state.ejected_until = self._clock() + settings.eject_seconds
                self._metrics.upstream_up.labels(name).set(0)

    def cool_left_ms(self, name: str) -> int:
        """Until `name` may be sent requests again after a 429, in milliseconds."""
        return max(0, round((self._state(name).cooling_until - self._clock()) * 1000))

    def release_probe(self, name: str) -> None:
        """A probe slot taken but never used (the request went elsewhere): free it."""
        self._state(name).probe_until = 0.0


def cool_down_seconds(headers: Mapping[str, str], now: float | None = None) -> float:
    """How long a 429 asks to be left alone: `retry-after-ms`, `retry-after` (seconds), else the
    longest of OpenAI's `x-ratelimit-reset-*` (Go durations such as `1s`, `6m0s`, `20ms`), else
    DigitalOcean's `ratelimit-reset` (epoch seconds); else one second."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                pass
    resets = [
        _go_seconds(value) for name, value in headers.items() if name.lower().startswith("x-ratelimit-reset-")
    ]
    found = [r for r in resets if r is not None]
    if found:
        return max(found)
    epoch = headers.get("ratelimit-reset")
    if epoch is not None and epoch.strip().isdigit():
        return max(0.0, int(epoch) - (time.time() if now is None else now))
    return _DEFAULT_COOL_SECONDS


def _go_seconds(text: str) -> float | None:
    parts = _GO_PART.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)
