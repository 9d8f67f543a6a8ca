"""Process groups over MPI: the world, the data-parallel and pipeline-parallel sub-communicators, rank -> GPU.

Processes are started by `mpirun` / `mpiexec` (`mpirun -n 4 rawformer train ...`); MPI gives each its rank.
With `pp` pipeline stages the world of `size` ranks is laid out as a (dp, pp) grid, pipeline stages adjacent:

    rank = dp_index * pp + stage          (so a pipeline's stages share a node when they fit on one)
    data group     = the ranks with the same stage     (they all-reduce gradients)
    pipeline group = the ranks with the same dp_index  (they pass activations and gradients along)

Each rank uses the GPU of its *local* rank (its rank within the node, from MPI's shared-memory split) modulo
the node's GPU count. mpi4py is imported in `mpi()` only: this is the one import site of the `mpi` extra.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from typing import Any

from rawformer import backend

_MPI: types.ModuleType | None = None
_CURRENT: ProcessGroups | None = None


def mpi() -> types.ModuleType:
    """mpi4py's MPI module (imported once), or an ImportError that names the extra to install."""
    global _MPI
    if _MPI is None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(
                "rawformer.distributed needs mpi4py and an MPI library: install the mpi extra "
                "(pip install 'rawformer[mpi]', which brings mpi4py and the pip MPICH), or use your "
                f"cluster's MPI with mpi4py built against it ({exc})"
            ) from exc
        _MPI = MPI
    return _MPI


@dataclass
class Group:
    """A set of ranks that communicate: an MPI communicator plus, lazily, the GPU collectives over it.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
        The communicator (its own context: messages never mix with another group's).
    name : str
        'world', 'data' or 'pipeline' (appears in error messages).
    world_ranks : list[int]
        World rank of each member, by group rank.
    """

    comm: Any
    name: str
    world_ranks: list[int]
    _backends: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def collectives(self, kind: str, channel: str = "default") -> Any:
        """The collectives backend `kind` over this group ('mpi', 'nccl', 'mpi-cuda', 'host-staged'),
        created on first use and kept (an NCCL communicator is set up once per group and channel; the
        pipeline uses one channel per direction so its sends and receives never queue behind each other).
        Collective over the group on first use: every member must ask for it in the same order."""
        key = (kind, channel)
        if key not in self._backends:
            from rawformer.distributed import collectives

            self._backends[key] = collectives.make_backend(kind, self)
        return self._backends[key]

    def barrier(self) -> None:
        self.comm.Barrier()


@dataclass
class ProcessGroups:
    """The world and its data / pipeline groups for one process.

    Attributes
    ----------
    world, data, pipeline : Group
    local_rank : int
        Rank within this node (from the shared-memory split of the world).
    local_size : int
        Ranks on this node.
    stage : int
        Pipeline stage of this rank (0 .. pp-1).
    dp_index : int
        Data-parallel replica index (0 .. dp-1).
    device : int | None
        The CUDA device this rank uses, or None on a CPU-only machine.
    """

    world: Group
    data: Group
    pipeline: Group
    local_rank: int
    local_size: int
    stage: int
    dp_index: int
    device: int | None

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    @property
    def is_root(self) -> bool:
        """Rank 0 of the world: the one that prints and writes checkpoints."""
        return self.world.rank == 0

    def print0(self, *parts: Any) -> None:
        """Print on world rank 0 only (flushed: mpiexec forwards output line by line)."""
        if self.is_root:
            print(*parts, flush=True)


def _pick_device(local_rank: int, use_gpu: bool | None) -> int | None:
    """The GPU of this local rank (local_rank mod the node's GPU count), made current; None on CPU."""
    if use_gpu is False or (use_gpu is None and backend.name() == "cpu"):  # RAWFORMER_BACKEND=cpu counts
        return None
    cp = backend.cupy_module()
    if cp is None:
        if use_gpu:
            backend.require_cupy()
        return None
    count = cp.cuda.runtime.getDeviceCount()
    # CUDA_VISIBLE_DEVICES set per rank by a launcher leaves one device visible: local rank mod 1 = 0.
    dev = local_rank % count
    cp.cuda.Device(dev).use()
    return dev


def current() -> ProcessGroups:
    """The groups of this process: those of the last `init()`, or a fresh `init()` (all data parallel)."""
    return _CURRENT if _CURRENT is not None else init()


def init(pp: int = 1, comm: Any = None, use_gpu: bool | None = None) -> ProcessGroups:
    """Set up this process's groups (and pick its GPU): call before allocating anything on the device.
    Calling it again with the same arguments returns the same groups.

    Parameters
    ----------
    pp : int
        Pipeline stages; the world size must be a multiple of it (dp = size // pp).
    comm : mpi4py.MPI.Comm, optional
        The world to split (default MPI.COMM_WORLD; a duplicate is taken, so user messages never mix with
        ours).
    use_gpu : bool, optional
        True: require a GPU; False: stay on the CPU; None (default): a GPU if the active backend is the GPU
        (CuPy finds one and RAWFORMER_BACKEND does not say cpu).

    Returns
    -------
    ProcessGroups
    """
    global _CURRENT
    if _CURRENT is not None and comm is None and _CURRENT.pipeline.size == pp:
        return _CURRENT
    MPI = mpi()
    base = (comm if comm is not None else MPI.COMM_WORLD).Dup()
    size, rank = base.Get_size(), base.Get_rank()
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp must be a positive int, got {pp!r}")
    if size % pp:
        raise ValueError(f"pp={pp} pipeline stages do not divide the world of {size} ranks")
    stage, dp_index = rank % pp, rank // pp
    node = base.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    data = base.Split(color=stage, key=rank)
    pipe = base.Split(color=dp_index, key=rank)
    world = Group(base, "world", list(range(size)))
    data_g = Group(data, "data", [d * pp + stage for d in range(size // pp)])
    pipe_g = Group(pipe, "pipeline", [dp_index * pp + s for s in range(pp)])
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (see the GPU machine notes)
    device = _pick_device(local_rank, use_gpu)
    _CURRENT = ProcessGroups(world, data_g, pipe_g, local_rank, local_size, stage, dp_index, device)
    return _CURRENT
