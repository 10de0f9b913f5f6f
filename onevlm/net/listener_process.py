"""Extra listener processes: more CPU cores for receiving, one port (SO_REUSEPORT).

A pynetdicom listener is bound by Python's GIL to one core; receiving 0.5 MB instances costs
about 10 ms of CPU each. With ``listener.processes: N`` the service starts N-1 extra processes,
each a full Storage SCP on the same port writing to the same spool and journal; the kernel
spreads incoming associations across them. A child exits when the service stops or dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.synchronize import Event

from onevlm.net.config import ServiceConfig

logger = logging.getLogger(__name__)

PARENT_CHECK_SECONDS = 0.5


def _serve(config: ServiceConfig, ready: Event, stop: Event, parent_pid: int, log_level: int) -> None:
    # Only the service ends this process (``stop``, or the parent gone). A SIGTERM/SIGINT sent to the whole
    # process group (Ctrl-C, systemd's KillMode=control-group, ``kill -- -PGID``) would kill it inside
    # ``stop.wait()`` holding the event's shared lock, and the service's ``stop.set()`` would then block forever.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    from onevlm.net.disk_space import DiskGuard
    from onevlm.net.journal import Journal
    from onevlm.net.listener import Listener
    from onevlm.net.spool import Spool

    journal = Journal(config.journal_path)
    # Its own guard (same disk, same bounds): every process refuses while the spool's disk is too full.
    listener = Listener(config.listener, Spool(config.spool_dir, config.group_by), journal, reuse_port=True,
                        disk_guard=DiskGuard(config.spool_dir, config.disk))
    listener.start()
    ready.set()
    # Exit with the service: on stop, or when the parent is gone (kill -9 leaves no time to tell us).
    while not stop.wait(PARENT_CHECK_SECONDS):
        if os.getppid() != parent_pid:
            break
    listener.stop()
    journal.close()


def start_listener_processes(config: ServiceConfig, count: int, timeout: float = 60.0) -> tuple[list, Event]:
    """Start ``count`` listener processes; returns them and the event that stops them."""
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no model, no threads copied
    stop = context.Event()
    processes = []
    for _ in range(count):
        ready = context.Event()
        process = context.Process(target=_serve, args=(config, ready, stop, os.getpid(), logging.getLogger().level),
                                  name="onevlm-listener", daemon=True)
        process.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if not process.is_alive() or time.monotonic() > deadline:
                stop.set()
                raise RuntimeError(f"a listener process did not start (exit code {process.exitcode})")
        processes.append(process)
    return processes, stop
