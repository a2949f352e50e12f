"""The schedule actor: one AdaptiveSparsityScheduler for the whole run, outside the workers.

The driver creates it; its handle travels in the train-loop config. Rank 0 asks it for
`values(step)` once per training step (prefetched a step ahead) and broadcasts the answer, a
`Schedule` (per-layer targets, loss weight), so every rank applies the same values.

The scheduler is memoryless (see sparsebk.scheduler): the values of a step are a pure function
of the step and the latest validation loss. So the actor's state is small (the scheduler's
config, step and best loss, plus the latest validation loss), answers carry no state, and a
step's values can be asked again with the same answer.

Stopping: the driver calls `request_stop` (a SIGTERM or SIGINT); every answer from then on
carries `stop=True`, and rank 0 broadcasts it with the values, so every rank ends after the
same step, with a checkpoint of it (sparsebk.train.trainer).

Restarts: the actor is created with `max_restarts=-1`. A restarted actor re-runs `__init__`
and is not *ready*: it answers `values` with ScheduleNotReady until rank 0 pushes the state
back with `load_state_dict` (or a fresh run calls `reset`). The state is plain JSON-able
Python and is stored in every training checkpoint.
"""

from __future__ import annotations

from typing import NamedTuple

import ray


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


# num_cpus=0: the actor idles between calls and must not take a CPU a worker needs.
# max_task_retries=0: a call in flight when the actor dies raises RayActorError at once, and
# rank 0 pushes the state back before asking again.
ScheduleActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(ScheduleState)


def create_schedule_actor(schedule, n_layers: int, *, name: str | None = None,
                          namespace: str | None = None):
    """Create (or, for a named actor that exists, get) the run's schedule actor."""
    opts = {}
    if name is not None:
        opts.update(name=name, get_if_exists=True)
        if namespace is not None:
            opts["namespace"] = namespace
    return ScheduleActor.options(**opts).remote(schedule, n_layers)
