"""AsyncLLMEngine: the synchronous LLMEngine driven by its own thread, for asyncio callers.

The server's event loop must never wait on a model step, so the engine loop runs in a
background thread. Callers hand it commands (add, abort) through a thread-safe queue; the
thread applies them between steps and pushes each step's outputs into per-request asyncio
queues with `call_soon_threadsafe`. Torch releases the GIL inside its kernels, so the event
loop keeps answering while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import TensorParallelError, TokenmillError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger("tokenmill")

# A loop pass with work that takes longer than this means the engine is stuck: /health says 503.
# A step is milliseconds to a few seconds (a long prefill on a slow CPU); a minute is not a step.
STALL_SECONDS = 60.0


class QueueFullError(TokenmillError):
    """More requests are waiting than --max-queue allows (the server answers 429)."""


class UnavailableError(RuntimeError):
    """The request cannot be served here now; another try, or another server, may (the server answers 503)."""


class ServerShutdownError(UnavailableError):
    """The server is shutting down and the request's time to finish ran out."""

    def __init__(self, message: str = "the server is shutting down and this request's time to finish ran out"):
        super().__init__(message)


class EngineStepError(RuntimeError):
    """A model step failed; the requests in it were aborted (the server answers 500)."""


class RequestStream:
    """One accepted request's outputs, as the engine thread delivers them.

    Iterate it to get RequestOutputs until the request finishes. Leaving the iteration
    early (a client that went away) aborts the request, which frees its KV blocks; a stream
    that is never iterated must be closed with `abort()`.
    """

    def __init__(self, engine: "AsyncLLMEngine", request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._finished = False

    def put(self, item: RequestOutput | Exception) -> None:
        """Called from the engine thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self._finished:
                item = await self._queue.get()
                if isinstance(item, Exception):
                    self._finished = True
                    raise item
                self._finished = item.finished
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine.abort(self.request_id)


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    prompt_text: str | None
    priority: int
    tenant: str | None
    stream: RequestStream
    accepted: asyncio.Future


class AsyncLLMEngine:
    """Owns an LLMEngine and the thread that steps it.

    `engine` is an LLMEngine or a function that builds one; given a function, the engine thread
    builds it (and the constructor raises what building raised). The server does so: OpenMP
    keeps a team of worker threads for each thread that starts parallel work, and with the
    loader's team (in the main thread) beside the engine thread's own, every decode step took
    about twice as long (measured on 2 cores: 18 ms against 9 ms).

    `observer`, when given, is called from the engine thread with every finished
    RequestOutput and with ("abort", request_id) / ("error", request_id) events; the server
    uses it for its Prometheus metrics.
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_queue: int | None = None,
                 observer: Callable[[str, RequestOutput | str], None] | None = None):
        self.engine: LLMEngine | None = engine if isinstance(engine, LLMEngine) else None
        self.max_queue = max_queue
        self.observer = observer or (lambda kind, item: None)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._stopped = threading.Event()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._busy_since: float | None = None  # when the current loop pass with work began
        self._down: TensorParallelError | None = None  # set when the engine can never step again
        self._thread = threading.Thread(target=self._run, args=(engine,), name="tokenmill-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    # ---- called from the event loop ----------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          prompt_text: str | None = None, priority: int = 0,
                          tenant: str | None = None) -> RequestStream:
        """Hand a request to the engine thread; return its stream once the engine accepted it.

        Raises the engine's error for a rejected request (bad parameter, full queue), so a
        server can answer 4xx before it starts streaming.
        """
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, loop)
        accepted = loop.create_future()
        self._commands.put(_Add(request_id, prompt, params, prompt_text, priority, tenant, stream, accepted))
        try:
            await accepted
        except BaseException:  # rejected (a no-op abort) or cancelled while waiting (a needed one)
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def end_all(self) -> None:
        """End every request in flight with ServerShutdownError (thread-safe; the engine thread does it)."""
        self._commands.put(("end_all", None))

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)
        if self.engine is not None:
            self.engine.shutdown()  # its tensor-parallel workers, if any

    @property
    def num_in_flight(self) -> int:
        """Accepted requests that have not ended (a server drains until this is 0)."""
        return len(self._streams)

    @property
    def num_queued(self) -> int:
        """Waiting requests beyond the free seats: those the next step will not admit (what --max-queue limits)."""
        return self.engine.stats().num_queued

    @property
    def alive(self) -> bool:
        """Whether the engine thread lives and is not stuck in one step (/health says 503 when not)."""
        busy_since = self._busy_since
        stuck = busy_since is not None and time.monotonic() - busy_since > STALL_SECONDS
        return self._thread.is_alive() and not self._stopped.is_set() and not stuck and self._down is None

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        if self.engine is None:
            try:
                self.engine = engine()
            except BaseException as e:  # handed to the constructor, which raises it
                self._build_error = e
                return
            finally:
                self._built.set()
        self._built.set()
        while not self._stopped.is_set():
            idle = not self.engine.has_unfinished_requests()
            self._apply(self._commands.get() if idle else None)
            while True:
                try:
                    self._apply(self._commands.get_nowait())
                except queue.Empty:
                    break
            if self.engine.has_unfinished_requests():
                self._busy_since = time.monotonic()
                self._step()
                self._busy_since = None

    def _apply(self, command) -> None:
        if command is None:
            return
        if isinstance(command, _Add):
            self._add(command)
        elif command[0] == "end_all":
            for request_id, stream in list(self._streams.items()):
                self.engine.abort_request(request_id)
                stream.put(ServerShutdownError())
                self.observer("abort", request_id)
            self._streams.clear()
        elif command[0] == "abort":
            request_id = command[1]
            if self._streams.pop(request_id, None) is not None and request_id in self.engine.requests:
                self.engine.abort_request(request_id)
                self.observer("abort", request_id)

    def _add(self, cmd: _Add) -> None:
        loop = cmd.accepted.get_loop()
        try:
            if self._down is not None:
                raise UnavailableError(f"the engine is down and takes no requests: {self._down}")
            if self.max_queue is not None and self.num_queued >= self.max_queue:
                raise QueueFullError(f"the server is busy: {self.num_queued} requests are already waiting "
                                     f"(--max-queue {self.max_queue}); retry later")
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, prompt_text=cmd.prompt_text,
                                    priority=cmd.priority, tenant=cmd.tenant)
        except Exception as e:  # rejected: the caller gets the error, the engine is untouched
            loop.call_soon_threadsafe(_settle, cmd.accepted, e)
            return
        self._streams[cmd.request_id] = cmd.stream
        loop.call_soon_threadsafe(_settle, cmd.accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug or an out-of-memory: fail what was in flight, keep serving
            log.exception("engine step failed; aborting the %d requests in flight", len(self.engine.requests))
            if isinstance(e, TensorParallelError):  # a rank is gone for good: no later step can run
                self._down = e
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    stream.put(EngineStepError("the engine step failed and this request was aborted; "
                                               "the server log has the details"))
                self.observer("error", request_id)
            return
        for request_id, error in self.engine.pop_failed().items():  # it failed by itself; the others went on
            stream = self._streams.pop(request_id, None)
            if stream is not None:  # its own bad input (a grammar past its limits) says so; a bug does not
                stream.put(error if isinstance(error, TokenmillError) else EngineStepError(
                    "this request failed the engine step and was ended; the other requests go on; the server "
                    "log has the details"))
            self.observer("error", request_id)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                self.observer("finished", output)
            if stream is not None:
                stream.put(output)


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
