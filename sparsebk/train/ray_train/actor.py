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

import ray

# the actor's logic lives on the Ray-free training floor (sparsebk.train.schedule)
from sparsebk.train.schedule import ScheduleState

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
