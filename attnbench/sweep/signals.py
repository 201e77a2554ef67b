"""Ctrl-C and SIGTERM in a sweep: where a stop signal may interrupt at once, and where it waits.

A signal raises in the main thread wherever it happens to be. Landing inside a storage call
(SQLAlchemy halfway through a commit) it can leave a connection checked out with SQLite's write
lock held; every later write, the heartbeat thread's included, then waits for the lock until it
times out, and the sweep hangs instead of stopping. So a stop signal interrupts only a trial's
own computing (building, counting, training, measuring: :meth:`SigintGuard.work`) and is held
everywhere else, storage calls made from inside that computing included
(:meth:`SigintGuard.held`).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Optional


class Interrupted(KeyboardInterrupt):
    """A sweep stopped by SIGINT (Ctrl-C) or SIGTERM (what a scheduler or supervisor sends before
    it kills): finished trials are stored, the one cut short is marked to run again at once.
    ``signum`` is the signal; a command exits with ``128 + signum`` (130, 143)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SigintGuard:
    """Ctrl-C (and SIGTERM, handled the same way) stops a trial's own work at once, but waits out
    bookkeeping: Optuna's around the trial, and every storage call.

    Optuna's ``_run_trial`` cannot take a KeyboardInterrupt that arrives after the objective has
    returned, while it tells the storage (it fails with an UnboundLocalError, and the process
    exits 1 with a traceback instead of 130), and a storage call cut short can leave the database
    locked (module docstring). So, while installed (main thread only), SIGINT or SIGTERM raises
    :class:`Interrupted` only inside :meth:`work` (and not in a :meth:`held` region within it);
    elsewhere it is held, and :meth:`check` raises it at the next safe point. A second signal
    while one is held raises at once (a storage that hangs must not make Ctrl-C useless). A
    signal the process inherited as ignored (``nohup``, a background job of a script) stays
    ignored, as Python itself leaves it.

    A guard that is not installed never sees a signal: its regions cost nothing.
    """

    def __init__(self) -> None:
        self.pending: Optional[int] = None   # the signal held, if any
        self._open = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SigintGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self._open or self.pending is not None:
            self._open = False          # raised once: the bookkeeping that follows is held again
            self.pending = None
            raise Interrupted(signum)
        self.pending = signum

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        """The region where a stop signal interrupts at once (a trial's training and measuring)."""
        self.check()
        self._open = True
        try:
            yield
        finally:
            self._open = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A region inside :meth:`work` that a stop signal must not cut (a storage call): the
        signal waits, and is raised as the region ends (unless it ends with an error of its own)."""
        was_open, self._open = self._open, False
        try:
            yield
        finally:
            self._open = was_open
        if was_open:
            self.check()

    def check(self) -> None:
        """Raise the held signal, if any."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)
