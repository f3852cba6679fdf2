"""Concurrent users, one forward: greedy requests that arrive together are answered in one mixed-adapter batch.

Each request names its own adapter; a worker thread collects the requests that arrive within a short window (or
until the batch is full), groups those with the same prompt length and token budget (so no row is padded) and runs
one ``generate(..., adapter_names=[...])`` per group (PEFT's mixed-adapter batch: every row gets exactly its own
adapter, ``"__base__"`` the base model). A lone request is a batch of one through the same code, so a user's answer
does not depend on who else is asking. The switcher's lock is held for the batch, so switches, composition and
merging never interleave with it.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from sparse_peft.hotswap import BASE, AdapterSwitcher


@dataclass
class _Request:
    prompt_ids: list[int]
    adapter: str
    max_new_tokens: int
    answer: Future = field(default_factory=Future)


class BatchedGreedy:
    """Greedy generation for one model (switcher), batched across concurrent callers."""

    def __init__(self, switcher: AdapterSwitcher, pad_token_id: int, window_s: float = 0.02, max_batch: int = 8):
        self.switcher, self.pad_token_id = switcher, pad_token_id
        self.window_s, self.max_batch = window_s, max_batch
        self.batch_sizes: list[int] = []  # of every batch run, for the page and the load test
        self._pending: queue.Queue[_Request] = queue.Queue()
        threading.Thread(target=self._serve, name="demo-batching", daemon=True).start()

    def generate(self, prompt_ids: list[int], adapter: str, max_new_tokens: int) -> tuple[list[int], int]:
        """The new tokens for ``prompt_ids`` with ``adapter`` (or :data:`BASE`), and the size of the batch that
        answered them."""
        request = _Request(list(prompt_ids), adapter, int(max_new_tokens))
        self._pending.put(request)
        return request.answer.result()

    def _serve(self) -> None:
        while True:
            batch = [self._pending.get()]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self._pending.get(timeout=left))
                except queue.Empty:
                    break
            groups: dict[tuple[int, int], list[_Request]] = {}
            for request in batch:
                groups.setdefault((len(request.prompt_ids), request.max_new_tokens), []).append(request)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[_Request]) -> None:
        try:
            ids = torch.tensor([r.prompt_ids for r in group])
            names = ["__base__" if r.adapter == BASE else r.adapter for r in group]
            with self.switcher.lock, torch.no_grad():
                self.switcher.activate(BASE)  # unmerged: each row adds its own adapter's output
                out = self.switcher.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                    max_new_tokens=group[0].max_new_tokens, do_sample=False, pad_token_id=self.pad_token_id,
                )
            self.batch_sizes.append(len(group))
            for row, request in zip(out[:, ids.shape[1] :].tolist(), group, strict=True):
                request.answer.set_result((row, len(group)))
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error, the worker goes on
            for request in group:
                if not request.answer.done():
                    request.answer.set_exception(exc)
