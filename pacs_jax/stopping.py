"""Stop requests: SIGTERM (a spot VM being preempted) or SIGINT (Ctrl-C) ask the loop to save and
leave after the current step, on every host at the same step.

On a slice the signal reaches each host on its own schedule (or only one host), while every step
is a collective program: a host that left alone would hang the others in their next step, and the
checkpoint would miss. So the hosts agree at each step boundary, through the distributed runtime,
whether any of them was asked to stop.
"""

from __future__ import annotations

import logging
import signal
from typing import Optional

import jax
import numpy as np

log = logging.getLogger("pacs_jax")


class StopRequest:
    """A context manager that catches SIGTERM / SIGINT; `agreed()` is the hosts' common answer."""

    def __init__(self):
        self.signal_name: Optional[str] = None  # this host's signal
        self.reason: Optional[str] = None  # why every host stops (set by `agreed`)
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving, then exiting", self.signal_name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether to stop now. Every process must call this at the same step boundary: with
        several processes it is a collective (an all-gather of one flag per host), so all of them
        get the same answer and stop after the same step."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            stop = local
        else:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
            stop = bool(np.any(flags))
            if stop and not local:
                self.reason = "a stop request on another host"
        if stop and self.reason is None:
            self.reason = self.signal_name
        return stop
