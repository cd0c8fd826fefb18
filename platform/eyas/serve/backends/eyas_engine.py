"""The eyas engine behind the serving interface: one engine per replica, one stepping thread.

``EngineLoop`` owns the engine: only its thread calls it. It runs ``Engine.step()`` while any
request is in flight, so concurrent requests share every forward pass (continuous batching:
requests join and leave between steps). Submissions and aborts are commands the thread runs
between steps, in order, so the asyncio event loop never waits for a step to release the
engine's lock, and an abort sent right after a submit always finds the request. Each step's
outputs go to the submitting request's asyncio queue via ``call_soon_threadsafe``. A step that
raises fails the requests in flight (they are aborted and their callers get the error), the
thread keeps serving, and ``check_health`` reports the replica unhealthy after repeated
failures so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from eyas.serve.backends.base import (
    GenerationChunk,
    SpecStats,
    local_draft_dir,
    target_model_path,
)
from eyas.serve.detokenize import IncrementalDetokenizer

if TYPE_CHECKING:
    from eyas.engine.engine import Engine, RequestOutput
    from eyas.engine.sampling import SamplingParams
    from eyas.serve.config import ServeConfig

log = logging.getLogger(__name__)
Sink = Callable[["RequestOutput | BaseException"], None]
MAX_CONSECUTIVE_FAILURES = 3


class EngineLoop:
    """Steps an ``Engine`` on a daemon thread and routes outputs to per-request sinks."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.5,
                 torch_threads: int | None = None) -> None:
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._torch_threads = torch_threads  # set in the loop thread: OpenMP counts per thread
        self._sinks: dict[str, Sink] = {}  # touched by the loop thread only
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self.failures = 0  # consecutive failed steps
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="eyas-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               sink: Sink) -> Future:
        """Queue a request; ``sink`` receives its outputs (on the loop thread). The future
        fails with ValueError when the engine rejects the input (nothing is queued then)."""
        done: Future = Future()

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except ValueError as exc:
                done.set_exception(exc)
                return
            self._sinks[request_id] = sink
            done.set_result(None)

        self._command(add)
        return done

    def abort(self, request_id: str) -> None:
        """Drop a request (after its submission, if that is still queued); its slot is freed
        and its outputs are discarded."""

        def drop() -> None:
            self._sinks.pop(request_id, None)
            self.engine.abort(request_id)  # the next step reports the abort; nobody listens

        self._command(drop)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)

    def _command(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        self._wake.set()

    def _run_commands(self) -> None:
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return
            fn()

    def _run(self) -> None:
        if self._torch_threads is not None:
            from eyas.runtime import use_torch_threads

            use_torch_threads(self._torch_threads)
        while not self._stop:
            self._run_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not kill the thread
                self._fail_all(exc)
                continue
            self.failures = 0
            for out in outputs:
                sink = (self._sinks.pop if out.finished else self._sinks.get)(out.request_id, None)
                if sink is not None:
                    sink(out)

    def _fail_all(self, exc: Exception) -> None:
        """Abort every request in flight and hand each caller the error."""
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.exception("engine step failed (%d in a row)", self.failures)
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
            sink(RuntimeError(f"the engine failed while running this request: {exc}"))


class EyasStream:
    """The ``GenerationStream`` of one eyas request (see ``backends.base``)."""

    def __init__(self, loop: EngineLoop, request_id: str, outputs: asyncio.Queue,
                 detok: IncrementalDetokenizer) -> None:
        self._loop, self._id, self._queue, self._detok = loop, request_id, outputs, detok
        self._done = False

    def __aiter__(self) -> EyasStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return self._chunk(item)

    def _chunk(self, out: RequestOutput) -> GenerationChunk:
        text = self._detok.add(out.new_token_ids)
        spec = None
        if out.finished:
            self._done = True
            stop = out.stop_reason if isinstance(out.stop_reason, str) else None
            text += self._detok.finish(stop)
            s = out.stats
            spec = SpecStats(s.verify_steps, s.accepted_tokens, s.decoded_tokens)
        return GenerationChunk(text, len(out.new_token_ids), out.prompt_tokens,
                               out.completion_tokens, out.finish_reason, spec)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._loop.abort(self._id)


class EyasBackend:
    """The project's engine (CPU or GPU), optionally with an EAGLE-3 draft."""

    name = "eyas"

    def __init__(self, cfg: ServeConfig, tokenizer: Any) -> None:
        import torch

        from eyas.engine.engine import Engine, SpecConfig

        ecfg = cfg.engine
        spec = None
        if cfg.speculative is not None:
            draft_dir = local_draft_dir(cfg.speculative.draft_path, "speculative.draft_path")
            knobs = cfg.speculative
            tree = ((knobs.num_steps, knobs.eagle_topk, knobs.num_draft_tokens) if knobs.knobs_set
                    else ())
            adaptive = knobs.speculation == "adaptive"
            spec = SpecConfig(draft_dir, *tree, ngram_tokens=knobs.ngram_tokens,
                              corpus_tokens=knobs.corpus_tokens,
                              max_speculative_batch=knobs.max_speculative_batch,
                              mode=knobs.speculation, calibrate=adaptive)
        self.tokenizer = tokenizer
        self.engine = Engine(target_model_path(cfg.model), spec=spec, device=ecfg.device,
                             dtype=getattr(torch, ecfg.dtype), max_batch_size=ecfg.max_batch_size,
                             max_seq_len=ecfg.max_seq_len, tokenizer=tokenizer)
        self.max_context = self.engine.max_seq_len
        self.max_batch_size = ecfg.max_batch_size
        self._loop = EngineLoop(self.engine, torch_threads=ecfg.num_threads)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> EyasStream:
        """Submit (ValueError for rejected input) and return the request's stream."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed at shutdown
                loop.call_soon_threadsafe(outputs.put_nowait, item)

        submitted = self._loop.submit(request_id, prompt_ids, params, sink)
        try:
            await asyncio.wrap_future(submitted)
        except asyncio.CancelledError:
            self._loop.abort(request_id)  # runs after the submission
            raise
        return EyasStream(self._loop, request_id, outputs,
                          IncrementalDetokenizer(self.tokenizer, params.stop))

    def info(self) -> dict[str, Any]:
        spec = self.engine.spec
        return {
            "engine": "eyas",
            "device": str(self.engine.device),
            "max_batch_size": self.max_batch_size,
            "max_context": self.max_context,
            "free_slots": self.engine.num_free_slots,
            "engine_has_unfinished": self.engine.has_unfinished(),
            "speculative": None if spec is None else {
                "algorithm": "EAGLE3", "num_steps": spec.num_steps,
                "eagle_topk": spec.eagle_topk, "num_draft_tokens": spec.num_draft_tokens,
                "ngram_tokens": spec.ngram_tokens, "corpus_tokens": spec.corpus_tokens,
                "max_speculative_batch": spec.max_speculative_batch, "speculation": spec.mode},
            "speculation_rounds": self.round_stats(),
            "round_time": None if spec is None else self.engine.round_records.overall(),
            "last_engine_error": self._loop.last_error,
        }

    def round_stats(self) -> dict[str, dict[str, Any]] | None:
        """Decode rounds per setting since the replica started (``RoundRecords.snapshot``:
        share, predicted vs measured mean round time); None without speculation."""
        return None if self.engine.spec is None else self.engine.round_records.snapshot()

    def check_health(self) -> None:
        if not self._loop.alive:
            raise RuntimeError("the engine loop thread has stopped; restart the replica")
        if self._loop.failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{self._loop.failures} engine steps failed in a row; last "
                               f"error: {self._loop.last_error}")

    def shutdown(self) -> None:
        self._loop.stop()
