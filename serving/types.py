"""What crosses the boundary between the HTTP layer and an engine: requests in, per-step outputs out.

The HTTP layer (serving/api) only talks to an ``EngineClient``; the embedded engine (async_engine.AsyncEngine)
is one implementation, and a vLLM-backed one would be another (docs/serving.md, Extension points).
Everything here is plain data, tokenizer-free except for the already-decoded text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from serving.presets import PresetTable
from serving.sampling import SamplingParams, TokenLogprobs
from supernet.placement import Placement


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status the API answers with."""

    status = 400
    code = "invalid_request"


class RequestTooLarge(EngineError):
    """Can never run on this server (context length or memory budget), whatever the load."""

    code = "context_length_exceeded"


class ServerBusy(EngineError):
    """The queue is full right now; retrying later can succeed."""

    status = 429
    code = "server_busy"


class EngineStopped(EngineError):
    status = 503
    code = "shutting_down"


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    placement: Placement
    params: SamplingParams
    preset: str = "custom"  # preset name, used for metrics labels
    arrival: float = 0.0  # time.monotonic() at arrival; set by the engine when 0
    speculative: bool | None = None  # self-speculative decoding: None = the server's rule (spec_policy)


@dataclass
class SpecUsage:
    """Self-speculative decoding counters of one sequence or request (reported in the response's usage)."""

    draft: str = ""  # the draft preset
    draft_tokens: int = 0  # tokens drafted
    accepted_tokens: int = 0  # drafted tokens the target accepted
    verify_steps: int = 0  # target forwards that verified drafts
    emitted_tokens: int = 0  # tokens those steps produced (accepted drafts + one target token each)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_verify_step(self) -> float:
        return self.emitted_tokens / self.verify_steps if self.verify_steps else 0.0

    def add(self, other: SpecUsage) -> None:
        self.draft = self.draft or other.draft
        for name in ("draft_tokens", "accepted_tokens", "verify_steps", "emitted_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class SequenceDelta:
    """What one of the request's ``n`` sequences produced since the previous output."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort"


@dataclass
class RequestOutput:
    request_id: str
    deltas: list[SequenceDelta]
    finished: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage.prompt_tokens_details)
    completion_tokens: int = 0  # so far, over all sequences
    # echo: one entry per prompt token (None for the first, which has no context), sent with the first output
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    error: str | None = None
    speculative: SpecUsage | None = None  # so far, over all sequences; None when the request does not speculate


@dataclass
class ModelInfo:
    name: str  # served model name (the bare id, = the default preset)
    max_model_len: int
    presets: PresetTable
    num_layers: int
    extra: dict[str, Any] = field(default_factory=dict)


class OutputStream(Protocol):
    """One request's outputs as they come; ``abort()`` (client gone) ends it and frees its cache."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def abort(self) -> None: ...


class EngineClient(Protocol):
    """What the HTTP layer needs from an engine (embedded, or a vLLM backend). Optional ``start()`` and
    ``shutdown(timeout)`` run with the app's lifespan; an optional ``accepting`` flag drives /health."""

    info: ModelInfo
    tokenizer: Any

    def submit(self, request: GenerationRequest) -> OutputStream:
        """Admit the request, raising EngineError (400/429/503) right away when it cannot be, before any
        response is sent; then stream its outputs."""
        ...

    def abort(self, request_id: str) -> None: ...

    def placement(self, spec: str | Sequence[str]) -> Placement: ...
