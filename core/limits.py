"""Resource limits for one request, with safe defaults, and the ledger of the memory that the
evaluations in progress hold against them."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .errors import LimitExceeded


#: What a refusal for want of memory held by other calls suggests waiting before the call is sent again.
RETRY_AFTER_SECONDS = 0.05


class MemoryLedger:
    """The bytes held by the evaluations in progress that share one :class:`Limits`: one server's,
    or one LocalClient's. ``max_memory_bytes`` bounds one request and all of them together, so a
    server's memory stays within its budget however many calls it admits (``max_concurrent`` counts
    calls; this counts what they hold). An evaluation takes what it will allocate before it starts
    (values, gradients, workspace, its response) and gives it back when it ends."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._lock = threading.Lock()

    def hold(self, nbytes: int) -> "Hold":
        """Take ``nbytes`` for one evaluation, or raise LimitExceeded (retry later) when the others hold
        too much of the budget; give them back with the Hold's ``release``."""
        hold = Hold(self)
        hold.add(nbytes)
        return hold

    def _take(self, nbytes: int) -> None:
        """Add ``nbytes`` to what is held (the caller holds ``_lock``), or raise LimitExceeded."""
        if self.held + nbytes > self.capacity:
            free = max(0, self.capacity - self.held)
            raise LimitExceeded(
                f"this call needs {nbytes} bytes more and the calls in progress hold {self.held} of the "
                f"{self.capacity} bytes this server may use (max_memory_bytes): retry later, or send "
                f"less work", limit="max_memory_bytes", requested=nbytes, allowed=free,
                retry_after=RETRY_AFTER_SECONDS)
        self.held += nbytes


class Hold:
    """What one evaluation holds in a ledger: more may be taken as it runs, all is given back once
    every one of its ``parties`` has released it (a server's call: the handler whose work and
    response hold the arrays, and gRPC once it has sent the response or ended the call). Every
    change goes under the ledger's one lock: two acquisitions per evaluation, no lock of its own."""

    __slots__ = ("_ledger", "nbytes", "_parties")

    def __init__(self, ledger: MemoryLedger, parties: int = 1) -> None:
        self._ledger = ledger
        self.nbytes = 0
        self._parties = parties

    def add(self, nbytes: int) -> None:
        if nbytes > 0:
            ledger = self._ledger
            with ledger._lock:
                ledger._take(nbytes)
                self.nbytes += nbytes

    def release(self) -> None:
        """One party is done; the last gives the bytes back (later calls do nothing)."""
        ledger = self._ledger
        with ledger._lock:
            self._parties -= 1
            if self._parties == 0:
                ledger.held -= self.nbytes
                self.nbytes = 0


@dataclass(frozen=True)
class Limits:
    """What one graph evaluation may use. Checked from shape inference, before allocation."""

    #: Operator nodes in a graph (declared inputs not counted).
    max_nodes: int = 1_000_000
    #: Elements in any one tensor (inputs, values, gradients).
    max_tensor_elements: int = 1 << 28
    #: Bytes of the values, gradients, workspace and response of one evaluation, and of all the
    #: evaluations in progress under these limits together (see :class:`MemoryLedger`).
    max_memory_bytes: int = 4 << 30
    #: The ledger of those evaluations: one per Limits object (``dataclasses.replace`` makes a new
    #: one), shared by every plan compiled with it.
    ledger: MemoryLedger = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ledger", MemoryLedger(self.max_memory_bytes))
