"""Which of the process's threads run below the event loop's priority (``--engine-nice``).

The engine lowers its own thread and ggml's compute threads (:func:`lower_threads`). A thread
that holds a lock the event loop also takes must keep the event loop's priority: lowered, it
can be preempted while holding the lock, and the event loop then waits for the scheduler to
run it again (milliseconds on a machine whose cores the engine keeps busy). The log writer
and the ledger writer are such threads (the event loop puts into their queues); they call
:func:`keep` once started.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_kept: set[int] = set()


def keep(thread: threading.Thread) -> None:
    """Never lower ``thread`` (started) below the priority it was created with."""
    if thread.native_id is not None:
        with _lock:
            _kept.add(thread.native_id)


def forget(thread: threading.Thread) -> None:
    """``thread`` has ended (or is about to): its id may be reused."""
    with _lock:
        _kept.discard(thread.native_id or -1)


def lower_threads(nice: int) -> None:
    """Give the calling thread, and the compute threads that its decodes use, ``nice`` (Linux).

    On a machine with few cores llama.cpp's threads take every core, and the event loop
    waits for the scheduler before it can answer ``/health`` or a cancel. Linux keeps a
    nice value per thread and a new thread inherits its creator's. ggml's compute threads
    are created by the thread that decodes: an OpenMP team per calling thread (libgomp
    keeps one pool per master thread), or a threadpool per graph without OpenMP. The model's
    warm-up decode ran in the loader thread, which may be this very thread (a reused worker
    thread), so its pool may already exist at the old value: every thread of the process
    but the main one (the event loop's) and the kept ones that runs at a higher priority
    than asked is lowered too; idle helper threads cost nothing at any value.
    """
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    with _lock:
        spared = {threading.main_thread().native_id, *_kept}
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:
        if tid not in spared:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:
                pass  # the thread exited
