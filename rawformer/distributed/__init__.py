"""Distributed training over MPI: process groups, collectives (NCCL / MPI), data parallel, pipeline
parallel, load balancing and fault handling. mpi4py (the `mpi` extra) is imported lazily, by `init()`.

    import rawformer.distributed as dist
    groups = dist.init(pp=1)                       # before allocating on the GPU: picks this rank's device
    dp = dist.DataParallel(model.parameters())     # gradients averaged over groups.data
"""

from rawformer.distributed.balance import LoadBalancer, proportional_shares
from rawformer.distributed.data_parallel import DataParallel
from rawformer.distributed.faults import Watchdog, load_checkpoint, save_checkpoint
from rawformer.distributed.groups import Group, ProcessGroups, current, init, mpi
from rawformer.distributed.pipeline import AutogradStage, Pipeline, partition, plot_timeline, schedule

__all__ = [
    "AutogradStage",
    "DataParallel",
    "Group",
    "LoadBalancer",
    "Pipeline",
    "ProcessGroups",
    "Watchdog",
    "current",
    "init",
    "load_checkpoint",
    "mpi",
    "partition",
    "plot_timeline",
    "proportional_shares",
    "save_checkpoint",
    "schedule",
]
