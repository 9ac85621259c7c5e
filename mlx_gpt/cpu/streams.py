"""One CPU stream per core for a training step, each with a one-thread BLAS.

MLX runs each CPU stream's kernels on one thread; only BLAS uses several. Splitting a batch over one stream per
core keeps every core busy through the elementwise parts of a step too. The cores are this machine's, divided
among the ranks of a data-parallel job that run on it (each OpenBLAS would otherwise start one thread per core).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from .blas import BlasChoice


def processes_on_this_machine(rank: int) -> int:
    """How many ranks of an ``mlx.launch`` job run on this machine (from the ring backend's hostfile, where each
    rank is listed with its IP addresses, or MPI's local size); 1 when it cannot tell."""
    if os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").isdigit():
        return int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    try:
        ranks = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
        addresses = [tuple(sorted(entry.rsplit(":", 1)[0] for entry in rank_entries)) for rank_entries in ranks]
        return addresses.count(addresses[rank])
    except (KeyError, OSError, ValueError, TypeError, AttributeError, IndexError):
        return 1


def split_cores(blas: BlasChoice, batch_size: int) -> tuple[int, str | None]:
    """Share this process's cores between CPU streams and BLAS threads (setting the threads); returns (streams,
    a banner line or None). ``MLX_GPT_CPU_STREAMS=N`` asks for N streams (1: off); they divide the batch evenly."""
    if (blas.set_num_threads is None or os.environ.get("OPENBLAS_NUM_THREADS")
            or mx.default_device().type != mx.DeviceType.cpu):
        return 1, None  # no BLAS whose threads we set, the user chose its threads, or the work is on a GPU
    group = mx.distributed.init()
    processes_here = processes_on_this_machine(group.rank()) if group.size() > 1 else 1
    cores = max(1, (os.cpu_count() or 1) // processes_here)
    wanted = os.environ.get("MLX_GPT_CPU_STREAMS", "").strip()
    most = max(1, int(wanted)) if wanted.isdigit() else cores
    streams = max(n for n in range(1, min(most, batch_size) + 1) if batch_size % n == 0)
    threads = max(1, cores // streams)
    blas.set_num_threads(threads)
    if streams == 1 and processes_here == 1:
        return 1, None
    return streams, (f"CPU: {streams} stream{'s' * (streams > 1)} x {threads} BLAS thread{'s' * (threads > 1)}"
                     + (f" in each of {processes_here} processes on this machine" if processes_here > 1 else ""))
