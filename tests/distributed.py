"""Spawning gloo process groups for tests: one spawn per world size, many checks inside it.

`run_distributed(world, fn, *args)` starts `world` CPU processes, initialises gloo and calls
`fn(rank, world, *args)` in each; a failure in any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import traceback
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fwl_scale.parallel.spawned import exit_spawned_rank


@contextmanager
def reserved_port() -> Iterator[int]:
    """A free TCP port for a rendezvous, held until the block ends. The socket is bound with SO_REUSEADDR
    but never listens: the kernel gives the port to no other bind (no other test can pick it between our
    choice and the store's bind, the race of a port looked up and released), while the rendezvous store,
    which binds with SO_REUSEADDR too (libuv does), can still listen on it."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
    finally:
        s.close()


def _entry(rank: int, world: int, port: int, fn, args, errors) -> None:
    # A rank killed by a signal (SIGABRT from a C++ library, SIGSEGV) leaves no Python traceback for the
    # error queue; faulthandler writes every thread's stack to the rank's stderr, which the test shows.
    faulthandler.enable(all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()


def run_distributed(world: int, fn, *args) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        with reserved_port() as port:
            mp.start_processes(_entry, args=(world, port, fn, args, errors), nprocs=world, start_method="spawn")
    except Exception as e:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        raise AssertionError("\n".join(msgs) or str(e)) from None
