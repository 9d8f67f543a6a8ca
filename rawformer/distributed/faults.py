"""Faults: a rank that dies or hangs stops the job within a timeout, with a message naming the rank.

Three pieces:

- `Watchdog`: every blocking wait of the distributed code (bucket all-reduces, pipeline receives) polls
  through `Watchdog.wait(work, what)` with a deadline. Each rank announces the step it reached with small
  non-blocking messages on its own communicator (`arrive(step)`); when a wait passes its deadline the rank
  knows which peers never announced the step, prints
  `rawformer.distributed: rank 3 waited 30 s for <what> at step 7; rank(s) [1] did not reach step 7 (dead
  or hung): stopping the job`, and aborts the MPI job (MPI_Abort ends every rank).
- `save_checkpoint` / `load_checkpoint`: npz files written to a temporary name, fsync'ed and renamed, so the
  last checkpoint stays valid whatever happens mid-write; rank 0 alone writes. Arrays only, no pickles.
- `rank_table` + `python -m rawformer.distributed.launch`: launchers such as MPICH's hydra kill every rank
  the moment one dies and name only its PID; each rank records its PID, and the launcher maps the PID back
  to the rank in its closing message.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rawformer.distributed.groups import Group, mpi

_HEARTBEAT_TAG = 7301
RANK_DIR_ENV = "RAWFORMER_RANK_DIR"
SOCKET_NAME = "alive.sock"
_ALIVE: list[socket.socket] = []  # this process's connection to the launch wrapper, open until it exits
DEFAULT_TIMEOUT_S = 300.0
_FORWARD_GRACE_S = 0.5  # seconds between printing the timeout message and aborting the job


class Watchdog:
    """Timed waits over a group, with step announcements that name the missing rank on a timeout.

    Parameters
    ----------
    group : Group
        The ranks to watch (usually the world). A duplicate of its communicator carries the announcements.
    timeout : float
        Seconds a wait may take before the job is stopped (> 0).
    abort : bool
        True (default): MPI_Abort the job on a timeout. False: raise TimeoutError instead (tests, and
        callers that clean up first).
    """

    def __init__(self, group: Group, timeout: float = DEFAULT_TIMEOUT_S, abort: bool = True):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.group, self.timeout, self.abort = group, float(timeout), abort
        self.comm = group.comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.step = -1
        self.seen = [-1] * self.size  # last step each rank announced
        self._inbox = np.zeros(1, dtype=np.int64)
        self._recv = self.comm.Irecv(self._inbox, source=mpi().ANY_SOURCE, tag=_HEARTBEAT_TAG)
        self._sends: list[tuple[Any, np.ndarray]] = []
        self.on_abort: list[Any] = []  # callables run before aborting (e.g. NCCL communicator aborts)
        atexit.register(self.close)  # runs before mpi4py's MPI_Finalize (atexit is last-in, first-out)

    def close(self) -> None:
        """Cancel the pending announcement receive (MPI would otherwise complain at finalize)."""
        if self._recv is not None:
            try:
                self._recv.Cancel()
                self._recv.Wait()
            except Exception:
                pass
            self._recv = None

    def arrive(self, step: int) -> None:
        """Announce that this rank reached `step` (call right before the waits of that step)."""
        self._drain()  # take the peers' announcements every step: none piles up in MPI's unexpected queue
        self.step = self.seen[self.rank] = int(step)
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        for peer in range(self.size):
            if peer != self.rank:
                msg = np.array([step], dtype=np.int64)  # kept alive until the send completes
                self._sends.append((self.comm.Isend(msg, dest=peer, tag=_HEARTBEAT_TAG), msg))

    def _drain(self) -> None:
        status = mpi().Status()
        while self._recv is not None and self._recv.Test(status):
            src = status.Get_source()
            self.seen[src] = max(self.seen[src], int(self._inbox[0]))
            self._recv = self.comm.Irecv(self._inbox, source=mpi().ANY_SOURCE, tag=_HEARTBEAT_TAG)

    def missing(self) -> list[int]:
        """Ranks (of the group) that have not announced the current step."""
        self._drain()
        return [r for r in range(self.size) if self.seen[r] < self.step]

    def wait(self, work: Any, what: str) -> None:
        """Block until `work.done()` (or `work()` for a callable) is true; stop the job after `timeout` s."""
        done = work if callable(work) and not hasattr(work, "done") else work.done
        start = time.monotonic()
        pause = 0.0
        while not done():
            elapsed = time.monotonic() - start
            if elapsed > self.timeout:
                self.fail(what)
            if elapsed > 0.002:  # spin briefly, then back off (ranks may share cores)
                pause = min(1e-3, pause * 2 or 2e-5)
                time.sleep(pause)
                self._drain()

    def message(self, what: str) -> str:
        gone = self.missing()
        world = self.group.world_ranks
        names = [world[r] for r in gone]
        if names:
            who = f"rank(s) {names} did not reach step {self.step} (dead or hung)"
        else:
            who = "every rank reached it, so a rank died inside the communication or the network stalled"
        return (
            f"rawformer.distributed: rank {world[self.rank]} waited {self.timeout:g} s for {what} at step "
            f"{self.step}; {who}: stopping the job"
        )

    def fail(self, what: str) -> None:
        """Report and stop: print the message on stderr, then abort the job (or raise TimeoutError)."""
        msg = self.message(what)
        print(msg, file=sys.stderr, flush=True)
        for hook in self.on_abort:
            try:
                hook()
            except Exception:
                pass
        if not self.abort:
            raise TimeoutError(msg)
        # MPI_Abort makes the launcher kill every rank at once; MPICH's hydra proxy can act on the abort
        # before it has forwarded the message still sitting in this rank's stderr pipe (a CI run lost it
        # so). Give the launcher a moment to pass the message on first.
        time.sleep(_FORWARD_GRACE_S)
        mpi().COMM_WORLD.Abort(75)


# ---- checkpoints -------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike, arrays: dict[str, Any], meta: dict[str, Any] | None = None
) -> None:
    """Write `arrays` (NumPy or CuPy; stored as NumPy) and a JSON-able `meta` to `path` (.npz) atomically.

    The file is written under a temporary name in the same directory, flushed to disk and renamed over
    `path`: a crash mid-write leaves the previous checkpoint intact. Call on one rank only (rank 0).
    """
    path = Path(path)
    if "__meta__" in arrays:
        raise ValueError("arrays may not use the reserved key '__meta__'")
    host = {
        k: (v.get() if hasattr(v, "get") and not isinstance(v, np.ndarray) else np.asarray(v))
        for k, v in arrays.items()
    }
    host["__meta__"] = np.array(json.dumps(meta or {}))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **host)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) from a file written by `save_checkpoint` (no pickles are loaded)."""
    with np.load(Path(path), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = json.loads(str(z["__meta__"])) if "__meta__" in z.files else {}
    return arrays, meta


# ---- the rank table ----------------------------------------------------------------------------------------


def rank_table(group: Group) -> list[dict[str, Any]]:
    """Every rank's host and PID (gathered to all); also written to $RAWFORMER_RANK_DIR/rank<r>.json when
    that is set (by `python -m rawformer.distributed.launch`), so a PID in a launcher's message maps back."""
    me = {"rank": group.world_ranks[group.rank], "host": socket.gethostname(), "pid": os.getpid()}
    where = os.environ.get(RANK_DIR_ENV)
    if where and not _ALIVE:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"rank{me['rank']}.json").write_text(json.dumps(me))
        sock_path = Path(where) / SOCKET_NAME
        if sock_path.exists():  # the launch wrapper listens: stay connected for life
            try:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(str(sock_path))
                conn.sendall(json.dumps(me).encode())
                _ALIVE.append(conn)
            except OSError:
                pass
    return group.comm.allgather(me)
