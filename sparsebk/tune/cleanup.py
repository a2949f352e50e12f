"""Free the placement groups that Ray Train leaves behind when Tune stops a trial.

Root cause (issue 12; upstream ray-project/ray#54305, "Broken resource sharing among Tune
trials"). Under Train V2 a trial is a function that runs a TorchTrainer: `fit()` starts a
TrainController *actor* owned by the trial's actor, and the controller creates the workers'
placement group. When ASHA (or any stop) ends a trial, Tune terminates the trial actor; the
controller dies with its owner without running its shutdown, so nothing removes the group.
GCS frees a non-detached placement group only when both its creating actor *and* its
creating job are dead, and the job is the sweep's driver: the group stays CREATED (or
PENDING, holding its place in the queue) until the whole sweep ends, and the next trials
wait for a worker group forever once the leaked groups hold the cluster's CPUs.

Upstream answered with a detached `PlacementGroupCleaner` per Train run (ray-project/ray
PR #58515, in the Ray we pin): it polls the controller's liveness through the *state API*,
i.e. an HTTP call from a worker process to the dashboard. That call needs a dashboard, an
address the worker resolves by itself (RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else the
machine-wide /tmp/ray/ray_current_cluster file, which names whichever Ray started last on
the machine) and, under token auth, the token. Measured here: from a task of a local Ray the
lookup raises `ray.exceptions.RpcError` (no dashboard, or another Ray's address), which the
cleaner's loop does not catch (it only catches RayStateApiException): its monitor thread
dies and the group stays until the job ends.

The fix here does not depend on the dashboard: the sweep's driver (already connected and
authenticated to GCS, on a local Ray and a cluster alike) reads the placement-group table
from GCS and removes every group that *this job* created from an actor that is now dead
(`creator_actor_dead`) and that is not detached. In a sweep the only such creators are the
Train controllers of stopped trials (Tune's own trial groups are created by the driver
itself, never by an actor). `PlacementGroupReaper` does this while Tune runs (throttled, on
Tune's loop steps and whenever a trial ends) and once more when the experiment ends.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

LIVE_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def _pg_table() -> list:
    """GCS's placement-group records (protobuf), with the creator fields that
    `ray.util.placement_group_table()` leaves out. GCS only: no dashboard, no HTTP."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    return [gcs_pb2.PlacementGroupTableData.FromString(b)
            for b in accessor.get_placement_group_table()]


def _state_name(rec) -> str:
    from ray.core.generated import gcs_pb2

    return gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(rec.state)


def _by_actor(rec) -> bool:
    """Created from an actor (a Train controller), not from a driver (GCS marks a driver's
    groups creator_actor_dead from the start: Tune's own trial groups look like that)."""
    return bool(rec.creator_actor_id) and rec.creator_actor_id != b"\xff" * len(rec.creator_actor_id)


def orphaned_placement_groups(job_id: str | None = None) -> list[str]:
    """Hex ids of live, non-detached groups that the job created from an actor now dead."""
    import ray

    job = bytes.fromhex(job_id or ray.get_runtime_context().get_job_id())
    return [rec.placement_group_id.hex() for rec in _pg_table()
            if rec.creator_job_id == job and _by_actor(rec) and rec.creator_actor_dead
            and not rec.is_detached and _state_name(rec) in LIVE_STATES]


def remove_orphaned_placement_groups(job_id: str | None = None) -> int:
    """Remove the job's orphaned groups (see the module doc); returns how many."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for pg_hex in orphaned_placement_groups(job_id):
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))
            removed += 1
        except Exception as e:  # noqa: BLE001 - already gone or GCS busy: the next pass retries
            logger.debug("placement group %s not removed: %s", pg_hex, e)
    if removed:
        logger.info("removed %d placement group(s) left by stopped trials", removed)
    return removed


def settle_placement_groups(timeout_s: float = 30.0, job_id: str | None = None) -> list[str]:
    """After a sweep: reap until no live group of the job has an actor creator (a stopped
    trial's controller takes a moment to die), or until `timeout_s`; returns the hex ids of
    the actor-created groups still live then (the test's leak check)."""
    import ray

    job = bytes.fromhex(job_id or ray.get_runtime_context().get_job_id())
    deadline = time.monotonic() + timeout_s
    while True:
        remove_orphaned_placement_groups(job_id)
        live = [rec.placement_group_id.hex() for rec in _pg_table()
                if rec.creator_job_id == job and _by_actor(rec) and not rec.is_detached
                and _state_name(rec) in LIVE_STATES]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


def _tune_callback_base():
    from ray import tune

    return tune.Callback


class PlacementGroupReaper(_tune_callback_base()):
    """A Tune callback (runs in the sweep's driver) that removes the orphaned groups every
    `interval_s` of Tune's loop, when a trial ends and when the experiment ends."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self._last = 0.0
        self.removed = 0

    def _reap(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        try:
            self.removed += remove_orphaned_placement_groups()
        except Exception as e:  # noqa: BLE001 - never let cleanup break the sweep
            logger.warning("placement-group cleanup failed (retried later): %s", e)

    def on_step_begin(self, iteration, trials, **info):
        self._reap()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._reap()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reap()

    def on_experiment_end(self, trials, **info):
        self._reap(force=True)
