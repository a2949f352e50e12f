"""One driver per run: a lease file in the run folder, through the store (local or a bucket).

    with RunLease(open_store(run_dir)) as lease:   # LeaseHeld if another driver holds it
        ...                                         # a thread renews it every `beat_s`
    lease.total_wall_s()                            # every driver's time on this run

`driver.lease.json` holds the holder (host, pid, a random token), when it started and its last
heartbeat. A second driver on the same run name refuses to start while the heartbeat is fresh,
naming the holder; a lease whose heartbeat is older than `stale_s` (a driver killed with
SIGKILL, a lost head) is taken over, with a warning. Object stores have no atomic
create-if-absent, so taking a lease is write, wait `settle_s`, read back: of two drivers that
write at once, the one whose token is read back wins and the other refuses. (A race inside
`settle_s` on a store without read-after-write consistency is the one gap; S3 and GCS give
that consistency.)

`run_time.json` keeps each finished driver's [start, end] (a stale lease's last heartbeat is
its end), so a run's wall time counts every job that trained it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from sparsebk.storage.store import Store

logger = logging.getLogger(__name__)

LEASE_FILE, RUN_TIME_FILE = "driver.lease.json", "run_time.json"


class LeaseHeld(ValueError):
    """Another driver is training this run."""


class RunLease:
    def __init__(self, run: Store, *, stale_s: float = 120.0, beat_s: float = 15.0,
                 settle_s: float = 1.0):
        self.run, self.stale_s, self.beat_s, self.settle_s = run, stale_s, beat_s, settle_s
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # another driver took the lease over (our heartbeat was late)

    # --- the lease file ------------------------------------------------------------------
    def _read(self) -> dict | None:
        if not self.run.is_file(LEASE_FILE):
            return None
        try:
            record = json.loads(self.run.read_text(LEASE_FILE))
        except (OSError, ValueError):
            return None  # a torn or foreign file: treated as no lease
        return record if isinstance(record, dict) else None

    def _write(self) -> None:
        self.run.write_text(LEASE_FILE, json.dumps({
            "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
            "started": self.started, "heartbeat": time.time()}))

    def check_free(self) -> dict | None:
        """LeaseHeld when another driver's lease is fresh; else the stale lease (or None).
        Cheap: what a command line asks before it connects to Ray."""
        held = self._read()
        if held is not None and held.get("token") != self.token:
            age = time.time() - float(held.get("heartbeat", 0))
            if age < self.stale_s:
                raise LeaseHeld(
                    f"{self.run.location(LEASE_FILE)}: run is being trained by another driver "
                    f"(pid {held.get('pid')} on {held.get('host')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.get('started', 0)))},"
                    f" last heartbeat {age:.0f} s ago). Stop that driver, or wait: a lease "
                    f"without a heartbeat for {self.stale_s:.0f} s is taken over")
            return held
        return None

    def acquire(self) -> "RunLease":
        held = self.check_free()
        if held is not None:
            age = time.time() - float(held.get("heartbeat", 0))
            logger.warning("taking over the run's lease from pid %s on %s (no heartbeat for "
                           "%.0f s: that driver is gone)", held.get("pid"), held.get("host"), age)
            self._record_attempt(held.get("started"), held.get("heartbeat"))
        self.run.makedirs()
        self._write()
        time.sleep(self.settle_s)
        back = self._read()
        if back is None or back.get("token") != self.token:
            raise LeaseHeld(f"{self.run.location(LEASE_FILE)}: another driver took this run's "
                            f"lease at the same moment (pid {(back or {}).get('pid')} on "
                            f"{(back or {}).get('host')}); this one stops")
        self._thread = threading.Thread(target=self._beat, name="sparsebk-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                held = self._read()
                if held is not None and held.get("token") != self.token:
                    self.lost = True
                    logger.error("this driver's lease on %s was taken over by pid %s on %s",
                                 self.run.uri, held.get("pid"), held.get("host"))
                    return
                self._write()
            except OSError as e:  # a store that does not answer for a while: try again
                logger.warning("could not renew the run's lease: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.beat_s + 5)
        try:  # best effort: a store that fails here (a full disk) must not hide why the run ended
            held = self._read()
            if held is not None and held.get("token") == self.token:
                try:
                    self._record_attempt(self.started, time.time())
                finally:
                    self.run.delete(LEASE_FILE)
        except OSError as e:
            logger.warning("could not release the run's lease at %s: %s", self.run.uri, e)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- wall time over every driver ----------------------------------------------------
    def _record_attempt(self, start, end) -> None:
        if start is None or end is None:
            return
        record = self._run_time()
        record["attempts"].append([float(start), float(end)])
        self.run.write_text(RUN_TIME_FILE, json.dumps(record))

    def _run_time(self) -> dict:
        try:
            record = json.loads(self.run.read_text(RUN_TIME_FILE))
            if isinstance(record.get("attempts"), list):
                return record
        except (OSError, ValueError, AttributeError):
            pass
        return {"attempts": []}

    def total_wall_s(self) -> float:
        """Seconds of every earlier driver of this run, plus this one's so far."""
        done = sum(max(0.0, e - s) for s, e in self._run_time()["attempts"])
        return done + (time.time() - self.started)
