"""Request queue for the server: requests run one at a time, first come first served, on one worker
thread that owns the model. Each request starts from an empty KV cache, so an answer never depends on
which requests came before it. (Batched decode across requests is the next step.)
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .engine import Engine
from .generate import Completion, Generation, TokenEvent
from .sampling import SamplingParams


class QueueFull(Exception):
    pass


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent | Completion | BaseException], None]  # called on the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Metrics:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_decode_tok_s: float = 0.0
    last_prefill_tok_s: float = 0.0
    live_decode_tok_s: float = 0.0  # of the answer being generated, updated every token (the page's expert view)
    started: float = field(default_factory=time.time)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine, self.max_queue = engine, max_queue
        self.metrics = Metrics()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._depth = 0
        self._lock = threading.Lock()
        self._session = engine.new_session()
        self._thread = threading.Thread(target=self._run, name="moe-offload-worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._depth

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._depth >= self.max_queue:
                raise QueueFull
            self._depth += 1
            self.metrics.requests += 1
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                if not job.cancelled.is_set():
                    self._serve(job)
            except BaseException as e:  # report to the request, keep serving
                job.emit(e)
            finally:
                with self._lock:
                    self._depth -= 1

    def _serve(self, job: Job) -> None:
        engine, m = self.engine, self.metrics
        self._session.reset()
        generation = Generation(self._session, engine.tokenizer, job.prompt_ids, job.params, engine.eos_ids)
        first, n, m.live_decode_tok_s = 0.0, 0, 0.0
        for event in generation:
            if job.cancelled.is_set():  # the client went away: free the worker for the next request
                m.cancelled += 1
                return
            if event.token_id is not None:  # decode speed from the first token on, so prefill is not in it
                n, now = n + 1, time.perf_counter()
                if n == 1:
                    first = now
                elif now > first:
                    m.live_decode_tok_s = (n - 1) / (now - first)
            job.emit(event)
        c = generation.completion
        m.completed += 1
        m.prompt_tokens += c.prompt_tokens
        m.completion_tokens += c.completion_tokens
        m.last_decode_tok_s, m.last_prefill_tok_s = c.decode_tok_s, c.prefill_tok_s
        job.emit(c)
