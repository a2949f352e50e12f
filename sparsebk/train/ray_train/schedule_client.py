"""Where a training step gets its Schedule: the actor (rank 0, prefetched, broadcast) or an
in-process scheduler (plain single-process loops and benchmarks: `LocalSchedule`, in
sparsebk.train.schedule, which imports no Ray).

Both sources have the same three calls, in this order per evaluation:

    get(step, prefetch_next)   the step's Schedule
    report_validation(loss)    after an evaluation (a finite, all-reduced loss)
    checkpoint_state()         the scheduler state to store with the checkpoint of this step

Ordering with the actor: the values of step t + 1 are requested while step t computes, except
after an evaluation step, where they are requested after the validation loss was reported; so
a validation loss at step t reaches the schedule at step t + 1, and a resumed run (which pushes
the checkpointed state, validation loss included) continues the same timeline.

A stop request (the driver's SIGTERM / SIGINT) travels in the values (`Schedule.stop`), so
every rank learns it at the same step; the values of a step that carries it are not followed
by a prefetch.

Recovery: a call that fails with RayActorError (the actor died with it in flight) or
ScheduleNotReady (a restarted actor without state) makes rank 0 push the state of the last
checkpoint back, re-send the newest validation loss, and ask again. The values are a pure
function of (step, latest validation loss), so the answer is the one the lost actor would
have given.
"""

from __future__ import annotations

import logging
import time

import ray
import torch

from sparsebk.train.schedule import Schedule, ScheduleNotReady

logger = logging.getLogger("sparsebk.train")


def _actor_lost(e: Exception) -> bool:
    if isinstance(e, ray.exceptions.RayActorError):
        return True
    return isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, ScheduleNotReady)


class ScheduleClient:
    """Rank 0's handle on the schedule actor: prefetch, recovery, the checkpoint state."""

    def __init__(self, actor, state: dict | None, *, retry_timeout_s: float = 60.0):
        """`state`: the checkpoint's scheduler state (None: a fresh run; the actor resets)."""
        self.actor = actor
        self.retry_timeout_s = retry_timeout_s
        if state is None:
            ray.get(actor.reset.remote())
            state = ray.get(actor.state_dict.remote())
        else:
            ray.get(actor.load_state_dict.remote(state))
        self.saved = state  # pushed back after an actor restart
        self.last_val = state.get("last_val_loss")
        self.pending: tuple[int, ray.ObjectRef] | None = None

    def _call(self, issue, what: str):
        deadline = time.monotonic() + self.retry_timeout_s
        ref = issue()
        while True:
            try:
                return ray.get(ref)
            except Exception as e:  # noqa: BLE001 (only actor loss is retried)
                if not _actor_lost(e):
                    raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"schedule actor unavailable for "
                                       f"{self.retry_timeout_s:.0f} s ({what}): {e}") from e
                logger.warning("schedule actor lost (%s) during %s; pushing the checkpoint "
                               "state back", type(e).__name__, what)
                self._recover(deadline)
                ref = issue()

    def _recover(self, deadline: float) -> None:
        state = dict(self.saved, last_val_loss=self.last_val)
        while True:
            try:
                ray.get(self.actor.load_state_dict.remote(state))
                return
            except ray.exceptions.RayActorError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError("schedule actor did not come back after a restart") from e
                time.sleep(0.2)  # still restarting

    def get(self, step: int, *, prefetch_next: bool = True) -> Schedule:
        ref = self.pending[1] if self.pending is not None and self.pending[0] == step else None
        self.pending = None

        def issue():  # the prefetched call first; a fresh one after a recovery
            nonlocal ref
            r, ref = ref, None
            return r if r is not None else self.actor.values.remote(step)

        out = Schedule(*self._call(issue, f"step {step}"))
        if prefetch_next and not out.stop:  # a stop: this step is the last
            self.pending = (step + 1, self.actor.values.remote(step + 1))
        return out

    def report_validation(self, val_loss: float) -> None:
        self.last_val = float(val_loss)
        self.actor.report_validation.remote(self.last_val)

    def checkpoint_state(self) -> dict:
        self.saved = self._call(lambda: self.actor.state_dict.remote(), "checkpoint state")
        return self.saved


class BroadcastSchedule:
    """Every rank's source under DDP: rank 0 asks `source`, a CPU (gloo) broadcast hands the
    values to the others. Non-zero ranks pass `source=None`."""

    def __init__(self, source, n_layers: int, group, world_size: int):
        self.source, self.n_layers, self.group, self.world = source, n_layers, group, world_size

    def get(self, step: int, *, prefetch_next: bool = True) -> Schedule:
        values = self.source.get(step, prefetch_next=prefetch_next) if self.source else None
        if self.world == 1:
            return values
        buf = torch.empty(self.n_layers + 2, dtype=torch.float64)  # targets, weight, stop
        if values is not None:
            buf[:self.n_layers] = torch.tensor(values.targets, dtype=torch.float64)
            buf[self.n_layers] = values.weight
            buf[self.n_layers + 1] = float(values.stop)
        torch.distributed.broadcast(buf, src=0, group=self.group)
        out = buf.tolist()
        return Schedule(out[:self.n_layers], out[self.n_layers], out[self.n_layers + 1] != 0.0)

    def report_validation(self, val_loss: float) -> None:
        if self.source is not None:
            self.source.report_validation(val_loss)

    def checkpoint_state(self) -> dict | None:
        return self.source.checkpoint_state() if self.source is not None else None
