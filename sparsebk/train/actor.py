"""The schedule actor: one AdaptiveSparsityScheduler for the whole run, outside the workers.

The driver creates it; its handle travels in the train-loop config. Rank 0 calls `next()` once
per training step (prefetched a step ahead) and broadcasts the answer to the other ranks, so
every rank applies the same per-layer targets and loss weight at every step.

Restarts: the actor is created with `max_restarts=-1`. A restarted actor re-runs `__init__`
(a fresh scheduler at step 0); rank 0 then pushes the state it holds back with
`load_state_dict`. The state is plain JSON-able Python and is also stored in every training
checkpoint, so a restarted worker group pushes the checkpointed state back the same way.
"""

from __future__ import annotations

import ray


def _layer_targets(out: dict, n_layers: int) -> list[float]:
    if "layer_targets" in out:
        targets = [float(t) for t in out["layer_targets"]]
        if len(targets) != n_layers:
            raise ValueError(f"schedule: {len(targets)} per-layer targets for a model with "
                             f"{n_layers} layers")
        return targets
    return [float(out["sparsity_target"])] * n_layers


class ScheduleState:
    """The actor's logic, kept as a plain class so it is testable (and timeable) in-process."""

    def __init__(self, scheduler_kwargs: dict, n_layers: int):
        from sparsebk.scheduler import AdaptiveSparsityScheduler

        self._kwargs = dict(scheduler_kwargs)
        self.n_layers = int(n_layers)
        self.scheduler = AdaptiveSparsityScheduler(**self._kwargs)
        self.calls = 0  # steps served on this run's schedule timeline (restored with the state)
        self.served = 0  # calls this process served (not restored: counts real traffic)
        self.last_val_loss: float | None = None

    def next(self) -> tuple[list[float], float, dict]:
        """Advance one step: (per-layer targets, loss weight, state after this step)."""
        out = self.scheduler.step(current_accuracy=self.last_val_loss)
        self.calls += 1
        self.served += 1
        return _layer_targets(out, self.n_layers), float(out["loss_weight"]), self.state_dict()

    def report_validation(self, val_loss: float) -> None:
        """The all-reduced validation loss, given to the scheduler as `current_accuracy`."""
        self.last_val_loss = float(val_loss)

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "calls": self.calls,
                "last_val_loss": self.last_val_loss}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.calls = int(state["calls"])
        self.last_val_loss = state.get("last_val_loss")

    def reset(self) -> None:
        self.scheduler.reset()
        self.calls = 0
        self.last_val_loss = None

    def stats(self) -> dict:
        return {"calls": self.calls, "served": self.served}


# num_cpus=0: the actor idles between calls and must not take a CPU a worker needs.
# max_task_retries=0: a call in flight when the actor dies raises RayActorError at once;
# rank 0 pushes state back and asks again (retrying blindly would advance a fresh scheduler).
ScheduleActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(ScheduleState)


def create_schedule_actor(scheduler_kwargs: dict, n_layers: int, *, name: str | None = None,
                          namespace: str | None = None):
    """Create (or, for a named actor that exists, get) the run's schedule actor."""
    opts = {}
    if name is not None:
        opts.update(name=name, get_if_exists=True)
        if namespace is not None:
            opts["namespace"] = namespace
    return ScheduleActor.options(**opts).remote(scheduler_kwargs, n_layers)
