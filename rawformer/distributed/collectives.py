"""Collectives over a Group: NCCL for GPU arrays, CUDA-aware or host-staged MPI, plain MPI for CPU arrays.

Every operation is asynchronous and returns a `Work` handle; `work.done()` polls without blocking and
`work.wait()` blocks (the fault watchdog waits through `done()` with a deadline, so nothing hangs silently).

Backends (`make_backend(kind, group)`):

    'mpi'          NumPy arrays: MPI_Iallreduce / Ibcast / Isend / Irecv in place.
    'nccl'         CuPy arrays: cupy.cuda.nccl on a CUDA stream; the unique id is made on group rank 0 and
                   broadcast over MPI. Completion is a CUDA event recorded after the operation.
    'mpi-cuda'     CuPy arrays handed to a CUDA-aware MPI (only where mpi4py's Query_cuda_support says so);
                   the stream is synchronised first, since MPI knows nothing of CUDA streams.
    'host-staged'  CuPy arrays copied to the host, MPI there, copied back when MPI completes.

A group of one rank needs no communication: there the GPU backends ('nccl', 'host-staged') do an in-place
all-reduce as a no-op and an out-of-place one as a device copy on the stream, each with its completion event
(NCCL's own one-rank in-place all-reduce is a ~1 us no-op too; host-staged skips the round trip to the host).

`default_kind(array)` picks: NumPy -> 'mpi'; CuPy -> 'nccl' when cupy.cuda.nccl imports, else 'mpi-cuda' when
the MPI reports CUDA support, else 'host-staged'. `RAWFORMER_COLLECTIVES` overrides the choice for CuPy.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from rawformer import backend
from rawformer.distributed.groups import Group, mpi

KINDS = ("mpi", "nccl", "mpi-cuda", "host-staged")
_ENV = "RAWFORMER_COLLECTIVES"


class Work:
    """An operation in flight. `done()` polls; `wait()` blocks until it completes."""

    def done(self) -> bool:
        raise NotImplementedError

    def wait(self) -> None:
        while not self.done():
            time.sleep(0)


class _Done(Work):
    def done(self) -> bool:
        return True


class _MpiWork(Work):
    """An MPI request; `then` runs once, right after it completes (host-staged copy back)."""

    def __init__(self, request: Any, then: Any = None):
        self._req, self._then, self._finished = request, then, False

    def done(self) -> bool:
        if not self._finished and self._req.Test():
            self._finished = True
            if self._then is not None:
                self._then()
        return self._finished


class _EventWork(Work):
    """A CUDA event recorded on the stream after the operation."""

    def __init__(self, event: Any):
        self._event = event

    def done(self) -> bool:
        return bool(self._event.done)

    @property
    def event(self) -> Any:
        return self._event


def cuda_aware_mpi() -> bool:
    """True where the MPI library says it can take CUDA device buffers (MPIX_Query_cuda_support)."""
    query = getattr(mpi(), "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:  # the MPI has the symbol but not the support
        return False


def nccl_module() -> Any:
    """cupy.cuda.nccl, or None when CuPy was built without NCCL."""
    if backend.cupy_module() is None:
        return None
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


def default_kind(array: Any) -> str:
    """The backend for arrays like `array` on this machine (see the module docstring)."""
    if not backend.is_cupy(array):
        return "mpi"
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced:
        if forced not in KINDS[1:]:
            raise ValueError(f"{_ENV} must be one of {', '.join(KINDS[1:])} for GPU arrays, got {forced!r}")
        return forced
    if nccl_module() is not None:
        return "nccl"
    return "mpi-cuda" if cuda_aware_mpi() else "host-staged"


def _local_allreduce(buf: Any, out: Any, stream: Any) -> Work:
    """The all-reduce of a one-rank group: the sum is buf itself. In place: nothing to do; into `out`: a
    copy. CuPy arrays: on `stream` (default: the current one), with a timed completion event recorded there
    after it, so a caller orders other streams after it exactly as after a real collective."""
    if out is not None:
        _same(buf, out)
    if not backend.is_cupy(buf):
        if out is not None:
            np.copyto(out, buf)
        return _Done()
    cp = sys.modules["cupy"]
    stream = stream if stream is not None else cp.cuda.get_current_stream()
    if out is not None and buf.nbytes:
        cp.cuda.runtime.memcpyAsync(
            out.data.ptr, buf.data.ptr, buf.nbytes, cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr
        )
    event = cp.cuda.Event(block=False)  # timed, like NcclCollectives' completion events
    event.record(stream)
    return _EventWork(event)


def _check(buf: Any, what: str) -> None:
    if not hasattr(buf, "dtype") or not hasattr(buf, "flags"):
        raise TypeError(f"{what} must be a NumPy or CuPy array, got {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (collectives work in place on its memory)")


def _same(buf: Any, out: Any) -> None:
    _check(out, "out")
    if out.shape != buf.shape or out.dtype != buf.dtype or type(out) is not type(buf):
        raise ValueError(
            f"out must match buf: got {type(out).__name__} {out.shape} {out.dtype}, expected "
            f"{type(buf).__name__} {buf.shape} {buf.dtype}"
        )


class MpiCollectives:
    """MPI on host (NumPy) arrays; with `device_buffers=True`, CuPy arrays to a CUDA-aware MPI."""

    kind = "mpi"

    def __init__(self, group: Group, device_buffers: bool = False):
        self.group = group
        self.comm = group.comm
        self.device_buffers = device_buffers
        if device_buffers:
            self.kind = "mpi-cuda"

    def _buf(self, buf: Any, what: str) -> Any:
        _check(buf, what)
        if backend.is_cupy(buf):
            if not self.device_buffers:
                raise TypeError(
                    f"{what} is a CuPy array: use the 'nccl', 'mpi-cuda' or 'host-staged' backend"
                )
            sys.modules["cupy"].cuda.get_current_stream().synchronize()  # MPI does not follow streams
        return buf

    def allreduce(self, buf: Any, stream: Any = None, out: Any = None) -> Work:
        """buf <- sum of buf over the group, in place (or into `out`, same shape and dtype)."""
        MPI = mpi()
        if out is None:
            return _MpiWork(self.comm.Iallreduce(MPI.IN_PLACE, self._buf(buf, "buf"), op=MPI.SUM))
        _same(buf, out)
        return _MpiWork(self.comm.Iallreduce(self._buf(buf, "buf"), self._buf(out, "out"), op=MPI.SUM))

    def broadcast(self, buf: Any, root: int = 0, stream: Any = None) -> Work:
        """buf <- buf of group rank `root`, in place."""
        return _MpiWork(self.comm.Ibcast(self._buf(buf, "buf"), root=root))

    def send(self, buf: Any, peer: int, tag: int = 0, stream: Any = None) -> Work:
        return _MpiWork(self.comm.Isend(self._buf(buf, "buf"), dest=peer, tag=tag))

    def recv(self, buf: Any, peer: int, tag: int = 0, stream: Any = None) -> Work:
        return _MpiWork(self.comm.Irecv(self._buf(buf, "buf"), source=peer, tag=tag))


def _portable(host: np.ndarray) -> np.ndarray:
    """A buffer every MPI can move: float16 (no portable MPI type; Open MPI rejects it) as its raw bytes."""
    return np.ascontiguousarray(host).view(np.uint8) if host.dtype == np.float16 else host


class HostStagedCollectives:
    """CuPy arrays through MPI on host copies: device -> host, MPI, host -> device on completion."""

    kind = "host-staged"

    def __init__(self, group: Group):
        self.group = group
        self.comm = group.comm

    @staticmethod
    def _stage(buf: Any) -> np.ndarray:
        _check(buf, "buf")
        return sys.modules["cupy"].asnumpy(buf) if backend.is_cupy(buf) else buf

    @staticmethod
    def _back(buf: Any, host: np.ndarray) -> Any:
        """What copies `host` into `buf` once the MPI operation is done (None when buf is host itself)."""
        if buf is host:
            return None
        return (lambda: buf.set(host)) if backend.is_cupy(buf) else (lambda: np.copyto(buf, host))

    def allreduce(self, buf: Any, stream: Any = None, out: Any = None) -> Work:
        """buf <- sum of buf over the group, in place (or into `out`); one rank: no staging (a no-op)."""
        if self.group.size == 1:
            _check(buf, "buf")
            return _local_allreduce(buf, out, stream)
        MPI = mpi()
        host = self._stage(buf)
        if out is not None:
            _same(buf, out)
        target = buf if out is None else out
        if out is not None and host is buf:  # NumPy buf: sum a copy, buf itself stays as it was
            host = host.copy()
        if host.dtype == np.float16:  # no portable 16-bit MPI float type (Open MPI rejects it): sum in fp32
            wide = host.astype(np.float32)
            back = lambda: self._back(target, wide.astype(np.float16))()  # noqa: E731
            return _MpiWork(self.comm.Iallreduce(MPI.IN_PLACE, wide, op=MPI.SUM), back)
        return _MpiWork(self.comm.Iallreduce(MPI.IN_PLACE, host, op=MPI.SUM), self._back(target, host))

    def broadcast(self, buf: Any, root: int = 0, stream: Any = None) -> Work:
        host = self._stage(buf)
        return _MpiWork(self.comm.Ibcast(_portable(host), root=root), self._back(buf, host))

    def send(self, buf: Any, peer: int, tag: int = 0, stream: Any = None) -> Work:
        return _MpiWork(self.comm.Isend(_portable(self._stage(buf)), dest=peer, tag=tag))

    def recv(self, buf: Any, peer: int, tag: int = 0, stream: Any = None) -> Work:
        host = np.empty(buf.shape, dtype=buf.dtype)
        return _MpiWork(self.comm.Irecv(_portable(host), source=peer, tag=tag), self._back(buf, host))


class NcclCollectives:
    """cupy.cuda.nccl over the group's ranks (one GPU per rank). Operations go on `stream` (default: the
    current stream); the returned Work is an event recorded there after the operation."""

    kind = "nccl"

    def __init__(self, group: Group):
        nccl = nccl_module()
        if nccl is None:
            raise RuntimeError("the 'nccl' collectives need CuPy built with NCCL (cupy.cuda.nccl)")
        self.group, self.nccl, self.cp = group, nccl, sys.modules["cupy"]
        uid = nccl.get_unique_id() if group.rank == 0 else None
        uid = group.comm.bcast(uid, root=0)  # the id is a tuple of ints: small, pickled by mpi4py
        self.comm = nccl.NcclCommunicator(group.size, uid, group.rank)
        self._types = {
            np.dtype(np.float32): nccl.NCCL_FLOAT32,
            np.dtype(np.float16): nccl.NCCL_FLOAT16,
            np.dtype(np.float64): nccl.NCCL_FLOAT64,
            np.dtype(np.int32): nccl.NCCL_INT32,
            np.dtype(np.int64): nccl.NCCL_INT64,
            np.dtype(np.int8): nccl.NCCL_INT8,
            np.dtype(np.uint8): nccl.NCCL_UINT8,
        }

    def _args(self, buf: Any, stream: Any) -> tuple[int, int, int, Any]:
        _check(buf, "buf")
        if not backend.is_cupy(buf):
            raise TypeError("the 'nccl' collectives take CuPy arrays; NumPy arrays go through 'mpi'")
        dtype = self._types.get(np.dtype(buf.dtype))
        if dtype is None:
            raise TypeError(
                f"NCCL has no type for {buf.dtype}; expected one of {sorted(map(str, self._types))}"
            )
        stream = stream if stream is not None else self.cp.cuda.get_current_stream()
        return buf.data.ptr, buf.size, dtype, stream

    def _after(self, stream: Any) -> Work:
        event = self.cp.cuda.Event(block=False)  # timed: DataParallel measures exposed communication with it
        event.record(stream)
        return _EventWork(event)

    def allreduce(self, buf: Any, stream: Any = None, out: Any = None) -> Work:
        """buf <- sum of buf over the group, in place (or into `out`), queued on `stream`; one rank: a
        no-op (in place) or a device copy, without calling NCCL."""
        ptr, n, dtype, stream = self._args(buf, stream)
        if self.group.size == 1:
            return _local_allreduce(buf, out, stream)
        dst = ptr
        if out is not None:
            _same(buf, out)
            dst = self._args(out, stream)[0]
        self.comm.allReduce(ptr, dst, n, dtype, self.nccl.NCCL_SUM, stream.ptr)
        return self._after(stream)

    def broadcast(self, buf: Any, root: int = 0, stream: Any = None) -> Work:
        ptr, n, dtype, stream = self._args(buf, stream)
        self.comm.bcast(ptr, n, dtype, root, stream.ptr)
        return self._after(stream)

    def send(self, buf: Any, peer: int, tag: int = 0, stream: Any = None) -> Work:
        ptr, n, dtype, stream = self._args(buf, stream)
        self.comm.send(ptr, n, dtype, peer, stream.ptr)
        return self._after(stream)

    def recv(self, buf: Any, peer: int, tag: int = 0, stream: Any = None) -> Work:
        ptr, n, dtype, stream = self._args(buf, stream)
        self.comm.recv(ptr, n, dtype, peer, stream.ptr)
        return self._after(stream)

    def abort(self) -> None:
        """Abort the NCCL communicator (a peer died: kernels waiting on it are released)."""
        try:
            self.comm.abort()
        except Exception:
            pass


def make_backend(kind: str, group: Group) -> Any:
    """A collectives backend of `kind` over `group` (see the module docstring)."""
    if kind == "mpi":
        return MpiCollectives(group)
    if kind == "mpi-cuda":
        if not cuda_aware_mpi():
            raise RuntimeError("this MPI does not report CUDA support: use 'nccl' or 'host-staged'")
        return MpiCollectives(group, device_buffers=True)
    if kind == "host-staged":
        return HostStagedCollectives(group)
    if kind == "nccl":
        return NcclCollectives(group)
    raise ValueError(f"unknown collectives kind {kind!r}; choose from {', '.join(KINDS)}")


def for_array(group: Group, array: Any) -> Any:
    """The group's backend for arrays like `array` (NumPy -> MPI, CuPy -> NCCL / MPI per default_kind)."""
    return group.collectives(default_kind(array))
