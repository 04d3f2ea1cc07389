"""SIGTERM and SIGUSR1 (SLURM's warning before a time limit or preemption) as a flag.

The handler only records the request: the Trainer acts on it at a step boundary all ranks agree
on, after a checkpoint, and a second signal during that save just sets the flag again.
"""
from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Within `with`: the stop signals set `requested` instead of ending the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._request)
            except ValueError:  # not the main thread (e.g. a launcher's job thread): leave them
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
