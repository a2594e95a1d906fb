"""The server's allocator tuning (server/memory.py): glibc keeps freed large blocks and one arena."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import ctypes, ctypes.util, sys, threading
import numpy as np
from chainrule.server.memory import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else None
def work():
    for _ in range(3):
        a = np.ones(1 << 20); a += 1.0; del a
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
print(tuned, flush=True)
ctypes.CDLL(ctypes.util.find_library("c")).malloc_stats()  # per-arena figures, on stderr
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's (elsewhere it changes nothing)")
def test_threads_of_a_tuned_process_share_one_arena():
    """Untuned, glibc gives threads arenas of their own (so gRPC's pool warms a heap per thread);
    tuned, every thread mallocs from one."""
    arenas = {}
    for mode in ("untuned", "tuned"):
        run = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120,
                             check=True)
        arenas[mode] = run.stderr.count("Arena ")
        if mode == "tuned":
            assert run.stdout.strip() == "True"
    assert arenas["tuned"] == 1 and arenas["untuned"] > 1
