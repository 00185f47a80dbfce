"""The OpenAI-compatible HTTP layer (FastAPI), one module per concern as vLLM lays out its entrypoints.

It parses and validates requests, resolves the preset, tokenizes, hands ``GenerationRequest``s to an engine
(serving.types.EngineClient) and formats what comes back -- it knows nothing about caches or batching, so
another engine (vLLM) can sit behind it unchanged.

- ``app``: ``create_app`` (lifespan, auth, /health, /metrics) and the router list
- ``errors``: OpenAI-shaped errors (``{"error": {"message", "type", "param", "code"}}``) and their handlers
- ``params``: request -> preset, prompt token ids and ``SamplingParams`` (plain functions tests call)
- ``streams``: engine submission, usage, collection of non-streaming results, SSE framing
- ``logprobs``: log-probability blocks in the completions and chat shapes
- ``completions``, ``chat``, ``models``: one module per endpoint
"""

from serving.api.app import ServerSettings, create_app
from serving.api.errors import APIError

__all__ = ["APIError", "ServerSettings", "create_app"]
