"""SIGINT/SIGTERM: the first asks for a graceful stop, a second exits at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator

from .exitcodes import RET_INTERRUPTED

log = logging.getLogger("runtime.signals")



@contextlib.contextmanager
def capture_signals(stop: asyncio.Event, enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(RET_INTERRUPTED)
        log.info("%s received: finishing in-flight work (send again to exit at once)",
                 signal.Signals(signum).name)
        stop.set()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
