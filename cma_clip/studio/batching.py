"""Micro-batching: calls from many threads run together as one batch.

The app's `/predict` handlers run in many threads at once. Each hands its item to the model's
`MicroBatcher` and waits; one worker thread runs whatever items are waiting as one batch
(`Predictor.predict_many`) and hands each caller its own result. A call that finds the model
idle runs at once, alone (no wait window by default, so a lone client pays nothing); calls that
arrive while a batch runs form the next one, up to `max_batch`. On a CPU one batch of 8 costs
far less than 8 single items, so throughput grows with the number of clients.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    """`submit(item)` from any thread returns `run(items)[i]` for its own item; a batch's exception
    goes to each of its callers. `window` (seconds) holds a batch open for later calls."""

    def __init__(self, run: Callable[[list[In]], Sequence[Out]], max_batch: int = 16, window: float = 0.0,
                 name: str = "micro-batcher") -> None:
        self.run, self.max_batch, self.window, self.name = run, max(1, max_batch), max(0.0, window), name
        self._waiting: queue.SimpleQueue[tuple[In, Future]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()  # batches run, by size (tests, benchmarks)

    def submit(self, item: In) -> Out:
        future: Future = Future()
        self._waiting.put((item, future))
        self._start()
        return future.result()

    def _start(self) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._worker.start()

    def _serve(self) -> None:
        while True:
            batch = [self._waiting.get()]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:  # whatever is waiting now, and what arrives within the window
                    batch.append(self._waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                                 if self.window else self._waiting.get_nowait())
                except queue.Empty:
                    break
            self.batch_sizes[len(batch)] += 1
            try:
                results = self.run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - each caller gets it
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)
