"""A run's sparsity schedule, without Ray: the values every rank applies at a step, and the
logic that produces them.

`ScheduleState` holds one AdaptiveSparsityScheduler and answers `values(step)` with a
`Schedule` (per-layer targets, loss weight, stop flag). On Ray it runs inside the schedule
actor (sparsebk.train.ray_train.actor), which hands every worker the same values; a plain
single-process loop, a benchmark or a test uses `LocalSchedule`, the same three calls
in-process (`get`, `report_validation`, `checkpoint_state`: the order is documented in
sparsebk.train.ray_train.schedule_client).

The scheduler is memoryless (see sparsebk.scheduler): the values of a step are a pure function
of the step and the latest validation loss, so the state is small, plain JSON-able Python,
and stored in every training checkpoint.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["LocalSchedule", "Schedule", "ScheduleNotReady", "ScheduleState"]


class Schedule(NamedTuple):
    """The one form of a step's schedule, from the actor to the layers."""

    targets: list[float]  # per layer, each in [0, 1)
    weight: float  # sparsity-loss weight
    stop: bool = False  # the driver asked the run to stop: this step is the last one


class ScheduleNotReady(RuntimeError):
    """The actor was (re)started and has not been given a state yet."""


class ScheduleState:
    """The actor's logic, kept as a plain class so it is testable (and timeable) in-process;
    the plain (non-Ray) training loop uses it directly."""

    def __init__(self, schedule, n_layers: int):
        """`schedule`: the training config's SchedulerConfig (validated there)."""
        from sparsebk.scheduler import AdaptiveSparsityScheduler

        self.n_layers = int(n_layers)
        self.scheduler = AdaptiveSparsityScheduler.from_config(schedule)
        # per-layer lengths are checked once, at config time (TrainConfig); this is an invariant
        assert self.scheduler.config.num_layers in (None, self.n_layers)
        self.last_val_loss: float | None = None
        self.ready = False
        self.served = 0  # answers this process gave (not restored: counts real traffic)

    def values(self, step: int) -> Schedule:
        """The schedule of training step `step` (1-based), given the latest validation loss."""
        if not self.ready:
            raise ScheduleNotReady("schedule actor has no state (restarted); push it back")
        out = self.scheduler.state_at(step, self.last_val_loss)
        self.scheduler.current_step = step
        self.served += 1
        targets = out.get("layer_targets") or [out["sparsity_target"]] * self.n_layers
        return Schedule([float(t) for t in targets], float(out["loss_weight"]),
                        self.stop_requested)

    def report_validation(self, val_loss: float) -> None:
        """The all-reduced validation loss (finite), the scheduler's `current_accuracy`."""
        self.last_val_loss = float(val_loss)
        best = self.scheduler.best_accuracy
        if best is None or self.last_val_loss < best:
            self.scheduler.best_accuracy = self.last_val_loss

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "last_val_loss": self.last_val_loss}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.last_val_loss = state.get("last_val_loss")
        self.ready = True

    def reset(self) -> None:
        self.scheduler.reset()
        self.last_val_loss = None
        self.ready = True

    def stats(self) -> dict:
        """calls: the last step served on the run's timeline (restored with the state);
        served: answers given by this process."""
        return {"calls": self.scheduler.current_step, "served": self.served}

    # the run's deterministic failure (sparsebk.train.errors): set by the worker that met
    # it, read by restarted workers (they stop at once) and by the driver (its message)
    fatal: str | None = None

    def set_fatal(self, reason: str) -> None:
        self.fatal = self.fatal or reason

    def fatal_reason(self) -> str | None:
        return self.fatal

    # the driver's stop request (SIGTERM / SIGINT): not part of the checkpointed state, and
    # kept through reset / load_state_dict (a worker group that starts after the request
    # stops after its first step)
    stop_requested: bool = False

    def request_stop(self) -> None:
        self.stop_requested = True


class LocalSchedule:
    """The calls of the actor's client on an in-process ScheduleState (no Ray, no broadcast)."""

    def __init__(self, scheduler_kwargs, n_layers: int, state: dict | None = None):
        self.state = ScheduleState(scheduler_kwargs, n_layers)
        if state is None:
            self.state.reset()
        else:
            self.state.load_state_dict(state)

    def get(self, step: int, *, prefetch_next: bool = True) -> Schedule:
        return self.state.values(step)

    def report_validation(self, val_loss: float) -> None:
        self.state.report_validation(val_loss)

    def checkpoint_state(self) -> dict:
        return self.state.state_dict()
