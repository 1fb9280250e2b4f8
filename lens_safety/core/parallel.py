"""Data-parallel runs on Hugging Face accelerate: split work over processes, gather on every process.

Run any lens_safety script (or ``lens-safety capture``) under ``accelerate launch`` and the
stages that use this module split their prompts over the processes — one per GPU
(``accelerate launch --multi_gpu --num_processes 8 ...``), several machines, or several CPU
processes — and gather the results in the original order: capture (``collect_residuals``,
``lens-safety capture``) and greedy generation (``evaluate_refusal``, ``jailbreak_pairs``),
each identical to a one-process run, with its cache written by the main process only. On a machine without CUDA,
``accelerate launch --multi_gpu --num_processes 2 ...`` (or ``torchrun --nproc_per_node 2``)
starts the processes and this module joins them with the gloo backend; note that
``accelerate launch --cpu --num_processes 2`` starts ONE process unless mpirun is configured. Launched plainly (one
process), every function here is a no-op, so the same code runs both ways.

The split is contiguous and in process order, so ``gather(f(split(items)[1]))`` equals
``f(items)`` whenever ``f`` works row by row.

>>> idx, mine = split(["a", "b", "c"])      # one process: everything
>>> idx, mine, gather([m.upper() for m in mine])
([0, 1, 2], ['a', 'b', 'c'], ['A', 'B', 'C'])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = ["state", "num_processes", "process_index", "is_main", "barrier", "split", "gather", "broadcast"]

T = TypeVar("T")


def state():
    """accelerate's ``PartialState`` when this run has several processes, else ``None``.

    Only a launcher-set ``WORLD_SIZE > 1`` initialises it, so a plain run never creates a
    process group (and never touches a GPU through accelerate).
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Without CUDA, accelerate sets up a process group only when told to use the CPU (gloo).
    s = PartialState(cpu=not torch.cuda.is_available())
    return s if s.num_processes > 1 else None


def num_processes() -> int:
    s = state()
    return 1 if s is None else int(s.num_processes)


def process_index() -> int:
    s = state()
    return 0 if s is None else int(s.process_index)


def is_main() -> bool:
    """True on the process that writes shared files and prints (always True in a plain run)."""
    return process_index() == 0


def barrier() -> None:
    """Wait until every process reaches this point (no-op in a plain run)."""
    s = state()
    if s is not None:
        s.wait_for_everyone()


def shard_bounds(n: int, n_proc: int | None = None, index: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of this process's contiguous share of ``n`` items (the first
    ``n % n_proc`` processes take one more, as ``split_between_processes`` does).

    >>> [shard_bounds(5, 2, i) for i in range(2)]
    [(0, 3), (3, 5)]
    """
    n_proc = num_processes() if n_proc is None else n_proc
    index = process_index() if index is None else index
    base, extra = divmod(n, n_proc)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def split(items: Sequence[T]) -> tuple[list[int], list[T]]:
    """This process's share of ``items``: ``(indices, items)``, contiguous, in process order."""
    start, stop = shard_bounds(len(items))
    return list(range(start, stop)), list(items[start:stop])


def gather(local: Sequence[Any]) -> list[Any]:
    """Concatenate every process's ``local`` list in process order, on every process.

    With :func:`split` this restores the original order. Objects travel pickled through
    ``torch.distributed`` (in memory, between our own processes; nothing is written to disk).
    """
    s = state()
    if s is None:
        return list(local)
    from accelerate.utils import gather_object

    return list(gather_object(list(local)))


def broadcast(obj: T) -> T:
    """The main process's ``obj``, on every process."""
    s = state()
    if s is None:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]
