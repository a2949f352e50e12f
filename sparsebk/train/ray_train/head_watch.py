"""A lost head node: the driver's bounded wait for it, and its one line.

    with HeadWatch(gcs_address, on_lost):   # on_lost(seconds_waited) when the head is gone
        trainer.fit()

When a cluster loses its head (its GCS), every Ray process of the cluster waits for it for
Ray's `gcs_rpc_server_reconnect_timeout_s` (60 s unless RAY_gcs_rpc_server_reconnect_timeout_s
says otherwise) and then ends; a driver on another node ends with a fatal log of Ray's own and
a stack dump, no word of the run, and the run's lease is left behind, so the next driver is
refused until the lease goes stale (sparsebk.storage.lease).

The watch probes the head's GCS port every second while a fit runs. When it has not answered
for three quarters of Ray's wait (45 s by default), `on_lost` runs in the watch's thread (the
driver's: the line naming the latest checkpoint, the lease released, exit 1), before Ray's
own end. A head that answers again sooner (a head restarted with GCS fault tolerance, which
Ray's processes reconnect to) is waited for, with a warning.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

logger = logging.getLogger("sparsebk.train")

RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"


def ray_reconnect_s() -> float:
    """How long Ray's processes wait for a lost GCS (Ray's default: 60 s)."""
    try:
        return float(os.environ.get(RECONNECT_ENV, "60"))
    except ValueError:
        return 60.0


class HeadWatch:
    def __init__(self, gcs_address: str, on_lost: Callable[[float], None], *,
                 limit_s: float | None = None, every_s: float = 1.0):
        host, _, port = gcs_address.rpartition(":")
        self.address, self.host, self.port = gcs_address, host, int(port)
        self.limit_s = 0.75 * ray_reconnect_s() if limit_s is None else limit_s
        self.every_s, self.on_lost = every_s, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sparsebk-head-watch",
                                        daemon=True)

    def answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.every_s):
                return True
        except OSError:
            return False

    def _watch(self) -> None:
        down_since = None
        while not self._stop.wait(self.every_s):
            if self.answers():
                if down_since is not None:
                    logger.warning("the Ray head at %s answers again", self.address)
                down_since = None
                continue
            now = time.monotonic()
            if down_since is None:
                down_since = now
                logger.warning("the Ray head at %s does not answer; waiting up to %.0f s for "
                               "it", self.address, self.limit_s)
            if now - down_since >= self.limit_s and not self._stop.is_set():
                self.on_lost(now - down_since)
                return

    def __enter__(self) -> "HeadWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.every_s + 1)
