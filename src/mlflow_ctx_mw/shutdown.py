"""Every answered request's trace reaches MLflow before the process ends, under every server.

MLflow sends what it still holds from an `atexit` hook, which runs only when the interpreter
exits normally. What servers do on SIGTERM (tests/test_shutdown.py):
- gunicorn's sync and threaded workers exit with sys.exit: MLflow's own hook runs;
- uvicorn re-raises SIGTERM after its graceful shutdown (mlflow #21865): the process dies of the
  signal. The ASGI middleware flushes at lifespan `shutdown.complete`, but Django's ASGI handler
  does not speak the lifespan protocol, nor does an app served with `--lifespan off`;
- waitress installs no SIGTERM handler: the default action kills the process at once;
- gunicorn's uvicorn workers reset SIGTERM to the default before uvicorn takes it over, and
  uvicorn gives the default back before it re-raises;
- granian's workers are multiprocessing children, which end with os._exit: atexit never runs
  there, multiprocessing's own finalizers do;
- hypercorn stops its loop and exits normally: MLflow's hook runs.

So, once per process, the middleware registers a flush with multiprocessing's finalizers (run at
a normal exit too), and, from the main thread (where Python runs signal handlers), puts a handler
in front of whatever handles SIGTERM. On the signal the server's own handler runs as before,
then: if no request is being answered, the flush runs (on the event loop's next turn, blocking it,
bounded; never inside the handler, see _flush_when_safe); else the last request to finish runs it
before its task ends, which a server's graceful shutdown waits for. Where the default action would
kill the process, a thread waits for the requests in flight and the flush (bounded), then raises
the signal again.
"""

from __future__ import annotations

import asyncio
import multiprocessing.util
import os
import signal
import threading
from typing import Any

from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.replay import SPOOLER

__all__ = ["IN_FLIGHT", "flush_pending", "install_shutdown_flush"]


def flush_pending(timeout: float) -> bool:
    """Send what MLflow still holds, waiting at most `timeout` s; True if it all went out. With the
    spool on, what did not (the server down, or slow past the timeout) is on disk after this."""
    if SPOOLER.down:  # on disk at once; the flush below then moves the rest there quickly
        SPOOLER.evacuate()
    done = threading.Event()

    def flush() -> None:
        try:
            _mlflow.flush_export()
        except Exception:
            log_once("flush", "MLflow failed to flush pending traces at shutdown")
        finally:
            done.set()

    try:
        threading.Thread(target=flush, name="mlflow-ctx-flush", daemon=True).start()
    except RuntimeError:  # at interpreter exit (3.12+: no new threads): flush here, unbounded
        flush()
        return True
    flushed = done.wait(timeout)
    SPOOLER.evacuate()  # what the server did not take in time (or is down for) goes to disk
    if not flushed:
        log_once(
            "flush-timeout", f"pending traces not flushed within {timeout:g}s at shutdown", exc_info=False
        )
        return False
    return True


class _InFlight:
    """Root spans started and not finished yet; once SIGTERM has come, the last one to finish
    flushes (inside its request, which the server's graceful shutdown waits for)."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition(threading.Lock())
        #: The flush timeout once SIGTERM has come; None before.
        self.stopping: float | None = None

    def enter(self) -> None:
        with self._idle:
            self._count += 1

    def leave(self) -> None:
        with self._idle:
            self._count -= 1
            last = self._count <= 0
            if last:
                self._idle.notify_all()
        if last and self.stopping is not None:
            flush_pending(self.stopping)

    def idle(self) -> bool:
        return self._count <= 0

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count <= 0, timeout)


IN_FLIGHT = _InFlight()
_installed = False


def _flush_if_idle(timeout: float) -> None:
    if IN_FLIGHT.idle():  # else the last request in flight flushes as it ends
        flush_pending(timeout)


def _flush_when_safe(timeout: float) -> None:
    """Not in the signal handler itself: the code it interrupted may hold a lock the flush needs
    (seen: Django's ASGI handler inside ThreadPoolExecutor.submit, holding the lock every
    executor shares, MLflow's export consumer among them). On an event loop the flush runs on
    the loop's next turn, blocking it before the server's shutdown coroutine can finish; without
    one, in a thread (such servers then exit normally, and the exit hooks flush as well)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _in_thread(_flush_if_idle, timeout)
    else:
        loop.call_soon_threadsafe(_flush_if_idle, timeout)


def _flush_then_die(signum: int, timeout: float) -> None:
    IN_FLIGHT.wait_idle(timeout)
    flush_pending(timeout)
    os.kill(os.getpid(), signum)  # the handler set the default action back: this ends the process


def _in_thread(target: Any, *args: Any) -> None:
    threading.Thread(target=target, args=args, name="mlflow-ctx-shutdown", daemon=True).start()


def install_shutdown_flush(timeout: float) -> None:
    """Put our SIGTERM handler in front of the current one, once per process (main thread only:
    elsewhere the lifespan flush and atexit are what there is)."""
    global _installed
    if _installed or timeout <= 0:
        return
    _installed = True

    def at_exit() -> None:  # a multiprocessing child's last act before os._exit; else atexit
        IN_FLIGHT.wait_idle(timeout)
        flush_pending(timeout)

    multiprocessing.util.Finalize(None, at_exit, exitpriority=100)
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            IN_FLIGHT.stopping = timeout
            if callable(previous):
                try:
                    previous(signum, frame)  # the server's graceful shutdown begins
                finally:
                    _flush_when_safe(timeout)
            elif previous != signal.SIG_IGN:  # the default action: die, but after the flush
                signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once
                _in_thread(_flush_then_die, signum, timeout)

        signal.signal(signal.SIGTERM, on_sigterm)
    except Exception:
        log_once("sigterm", "could not watch SIGTERM; pending traces may be lost at shutdown")
