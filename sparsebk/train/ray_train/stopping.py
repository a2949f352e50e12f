"""Stopping a run on request: SIGTERM or SIGINT to the driver.

    with stop_on_signals(cfg.run.stop_grace_s) as stop:   # main thread: the handlers
        ...                                                 # (a signal here: Stopped at once)
        with stop.watching(trainer):                        # while trainer.fit() runs
            result = trainer.fit()
    stop.signal, stop.aborted                               # what happened

The first SIGTERM or SIGINT during a fit asks the run's schedule actor to stop
(`request_stop`). The next values rank 0 gets from it carry `stop`, the broadcast hands that
to every rank, and every rank trains that step, saves a checkpoint of it through the normal
checkpoint path and returns: `fit` returns and no step is lost (sparsebk.train.trainer).

If no step ends within `run.stop_grace_s` (a slow step or checkpoint, workers still being
placed, workers that do not answer), or a second signal comes, the run is aborted the way
Ray Train aborts it on Ctrl-C (its controller's `abort`), and the steps since the latest
checkpoint are redone on resume. A third signal leaves at once. Outside a fit (data
preparation, the checks) the first signal raises Stopped at once: nothing was trained.

Ray Train's TorchTrainer puts its own SIGINT handler (that abort) in place when its
controller starts, through `_register_sigint_handler`; `watching` wraps that method on the
trainer so Ray's handler becomes the abort used here and SIGINT stays with this module. (Where
a Ray lacks the method, the handler found on SIGINT during the fit is used, as before.)
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

logger = logging.getLogger("sparsebk.train")


class RunFailed(RuntimeError):
    """Training stopped for good (retries spent, workers that cannot be placed): the message
    says why in one line and how to resume."""


class Stopped(RunFailed):
    """The driver was asked to stop (SIGTERM from a scheduler or a spot node, or SIGINT)."""


class StopRequest:
    """The driver's side of a stop: which signal came, and whether the run had to be aborted
    (`aborted`: why) instead of stopping at a step boundary. True once a signal came."""

    def __init__(self, grace_s: float, run_name: str = "run"):
        self.grace_s, self.run_name = grace_s, run_name
        self.signal: str | None = None
        self.aborted: str | None = None
        self._actor = None  # the run's schedule actor while a fit runs
        self._ray_abort = None  # Ray Train's SIGINT handler, once its controller started
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self.signal is not None

    def on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = name
            if self._actor is None:  # not training: nothing to save
                raise self._outside(name)
            if self.grace_s <= 0:
                self.abort(f"{name} with run.stop_grace_s=0")
                return
            self._actor.request_stop.remote()
            logger.warning("%s: the workers stop after their next step, with a checkpoint of "
                           "it (run.stop_grace_s=%g s; %s again aborts at once)", name,
                           self.grace_s, name)
            self._timer = threading.Timer(self.grace_s, self.abort, args=(
                f"no step ended within run.stop_grace_s={self.grace_s:g} s",))
            self._timer.daemon = True
            self._timer.start()
        elif self.aborted is None and self._actor is not None:
            self.abort(f"a second {name}")
        else:  # a third, or one after the fit: leave now
            raise self._outside(name)

    def _outside(self, name: str) -> Stopped:
        return Stopped(f"run {self.run_name} stopped by {name} while no worker trained for it; "
                       "the same command resumes from its latest checkpoint")

    def abort(self, why: str) -> None:
        """Ray Train's abort of the running fit (the grace period's end, a second signal)."""
        with self._lock:
            if self.aborted is not None or self._actor is None:  # aborted, or the fit ended
                return
            self.aborted = why
            ray_abort = self._ray_abort or _foreign_sigint_handler(self.on_signal)
        logger.warning("aborting the run (%s): the steps since its latest checkpoint will be "
                       "redone on resume", why)
        if ray_abort is None:
            return
        try:
            ray_abort(signal.SIGINT, None)
        except SystemExit:  # Ray's way out when its controller is gone: `fit` then ends
            pass            # on its own
        except Exception as e:  # noqa: BLE001 -- the abort is best effort; the fit's end says
            logger.warning("Ray Train's abort failed: %s", e)

    @contextlib.contextmanager
    def watching(self, trainer):
        """While `trainer.fit()` runs: a signal asks the workers to stop (see the module)."""
        register = getattr(trainer, "_register_sigint_handler", None)
        main = threading.current_thread() is threading.main_thread()
        if register is not None and main:
            def register_then_ours(controller):
                register(controller)
                self._ray_abort = signal.getsignal(signal.SIGINT)
                signal.signal(signal.SIGINT, self.on_signal)

            trainer._register_sigint_handler = register_then_ours
        self._actor = trainer.schedule_actor
        try:
            yield self
        finally:
            with self._lock:
                self._actor, self._ray_abort = None, None
            if self._timer is not None:
                self._timer.cancel()
            if main:  # Ray's handler must not outlive its controller
                signal.signal(signal.SIGINT, self.on_signal)


def _foreign_sigint_handler(ours):
    """The SIGINT handler Ray Train put in place, where `watching` could not take it over."""
    h = signal.getsignal(signal.SIGINT)
    return h if callable(h) and h is not ours else None


@contextlib.contextmanager
def stop_on_signals(grace_s: float, run_name: str = "run"):
    """A StopRequest whose handler takes SIGTERM and SIGINT (main thread only; elsewhere the
    handlers stay as they are), restored afterwards."""
    stop = StopRequest(grace_s, run_name)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.signal(s, stop.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
