"""Running independent pieces of a merge on several CPU threads.

torch runs each operator on its intra-op threads, which pays off on large tensors only; several
smaller independent pieces (tensors of a one-shot merge, slices of PCB's β, per-task sorts) go faster
side by side on Python threads, each on one torch thread (torch releases the GIL inside operators).
One torch thread per piece also keeps results independent of the thread count: element-wise work
gives the same bits on any number of threads, but matrix products and SVDs round by theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch


def map_on_threads(fn: Callable[[Any], Any], items: list[Any], workers: int, name: str) -> list[Any]:
    """``[fn(x) for x in items]``, on ``workers`` threads when more than one (for torch ops that run on one)."""
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        return list(pool.map(fn, items))


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """torch's intra-op threads set to ``n`` for the block (process-wide); yields the number there was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield before
    finally:
        torch.set_num_threads(before)
