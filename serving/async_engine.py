"""Runs an LLMEngine on its own thread and streams its outputs to asyncio tasks (the HTTP handlers).

One thread owns the model and every cache; the event loop only enqueues requests and reads outputs, so a slow
forward pass never blocks the server from accepting connections, answering /health or rejecting bad input.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from serving.engine import LLMEngine
from serving.types import EngineStopped, GenerationRequest, ModelInfo, RequestOutput
from supernet.placement import Placement

log = logging.getLogger("serving.engine")


class RequestStream:
    """Async iterator over one request's outputs; closing it early (client gone) aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self._engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.finished:
            self.finished = True
            self._engine._streams.pop(self.request_id, None)
        return out

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """The embedded implementation of serving.types.EngineClient."""

    def __init__(self, engine: LLMEngine, info: ModelInfo) -> None:
        self.engine = engine
        self.info = info
        self.tokenizer = engine.tokenizer
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.accepting = True

    def placement(self, spec: str | Sequence[str]) -> Placement:
        return self.engine.model.placement(spec)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="supernet-engine", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises serving.types.EngineError (400/429/503) when it cannot be admitted."""
        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        stream = RequestStream(self, request.request_id)
        self._streams[request.request_id] = stream
        try:
            self.engine.add_request(request)
        except Exception:
            self._streams.pop(request.request_id, None)
            raise
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let the engine finish what it holds (up to ``timeout``), then stop."""
        self.accepting = False
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine thread still busy after %.0f s; abandoning it", timeout)
            self._thread = None

    def _run(self) -> None:
        engine = self.engine
        while True:
            if not engine.has_work():
                if self._stop.is_set():
                    return
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as err:  # never let one bad batch kill the server
                log.exception("engine step failed")
                outputs = engine.fail_all(f"internal engine error: {type(err).__name__}: {err}")
            # One wake-up of the event loop per step, not one per sequence: each call_soon_threadsafe writes
            # to the loop's self-pipe, and at batch 8 the loop's work competes with this thread for the GIL.
            deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    deliveries.setdefault(stream.loop, []).append((stream, out))
            for loop, items in deliveries.items():
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)
