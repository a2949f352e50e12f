"""Rank 0's side of the schedule actor: prefetch, broadcast, recovery after actor restarts.

Call order on the actor (one caller, so Ray runs them in this order):

    next() for step t+1 is issued before step t is computed (prefetch), and an evaluation at
    the end of step t reports its validation loss after that; so the loss of an evaluation at
    step t first reaches the schedule at step t+2. A restart reproduces this order exactly.

Recovery: the actor is created with max_restarts=-1 and max_task_retries=0. A call that fails
with RayActorError, or an answer whose step counter is not the one expected (the actor was
restarted and answered from a fresh scheduler), makes rank 0 push the state it holds (the
state returned with the last step it consumed, with the validation loss that call saw) back
with load_state_dict, re-issue the call, and re-send a validation loss reported since.
"""

from __future__ import annotations

import logging
import time

import ray
import torch

logger = logging.getLogger("sparsebk.train")


class _StaleAnswer(Exception):
    pass


class ScheduleClient:
    """Holds the prefetched call and the last state rank 0 consumed."""

    def __init__(self, actor, state: dict | None, val_loss: float | None,
                 *, retry_timeout_s: float = 60.0):
        """`state`: the actor state after the last completed step (None: a fresh run, reset).
        `val_loss`: the validation loss last reported before the checkpoint (re-sent after the
        first prefetch, preserving the call order of the original run)."""
        self.actor = actor
        self.retry_timeout_s = retry_timeout_s
        self.recoveries = 0
        if state is None:
            ray.get(actor.reset.remote())
            state = ray.get(actor.state_dict.remote())
        else:
            ray.get(actor.load_state_dict.remote(state))
        self.held = state
        self.reported_val = state.get("last_val_loss")
        self.pending = None
        self.pending_val = self.reported_val
        self.issue()
        if val_loss is not None:
            self.report_validation(val_loss)

    def issue(self) -> None:
        self.pending = self.actor.next.remote()
        self.pending_val = self.reported_val

    def report_validation(self, val_loss: float) -> None:
        self.actor.report_validation.remote(float(val_loss))
        self.reported_val = float(val_loss)

    def get(self, step: int, *, prefetch: bool = True) -> tuple[list[float], float]:
        """Values for `step` (the prefetched call); issues the call for step + 1 if asked."""
        deadline = time.monotonic() + self.retry_timeout_s
        while True:
            try:
                targets, weight, state = ray.get(self.pending)
                if state["calls"] != step:
                    raise _StaleAnswer(f"actor answered step {state['calls']}, expected {step}")
                break
            except (ray.exceptions.RayActorError, _StaleAnswer) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"schedule actor unavailable for "
                                       f"{self.retry_timeout_s:.0f} s: {e}") from e
                logger.warning("schedule actor lost (%s); pushing the state of step %d back",
                               type(e).__name__, step - 1)
                self._recover(deadline)
        self.held = state
        if prefetch:
            self.issue()
        return targets, weight

    def _recover(self, deadline: float) -> None:
        self.recoveries += 1
        state = dict(self.held, last_val_loss=self.pending_val)
        while True:
            try:
                ray.get(self.actor.load_state_dict.remote(state))
                break
            except ray.exceptions.RayActorError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError("schedule actor did not come back after a restart") from e
                time.sleep(0.2)  # still restarting
        late_val = self.reported_val
        self.reported_val = self.pending_val
        self.issue()
        if late_val != self.pending_val and late_val is not None:
            self.report_validation(late_val)


def broadcast_schedule(values: tuple[list[float], float] | None, n_layers: int, group,
                       world_size: int) -> tuple[list[float], float]:
    """Rank 0's (targets, weight) on every rank, through a CPU (gloo) process group."""
    if world_size == 1:
        return values
    buf = torch.empty(n_layers + 1, dtype=torch.float64)  # (L + 1,): targets..., weight
    if values is not None:
        buf[:n_layers] = torch.tensor(values[0], dtype=torch.float64)
        buf[n_layers] = values[1]
    torch.distributed.broadcast(buf, src=0, group=group)
    out = buf.tolist()
    return out[:n_layers], out[n_layers]
