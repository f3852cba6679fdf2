"""Every core for the few tests that really train for minutes (conftest pins one thread for tiny matrices)."""

import contextlib
import os
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
