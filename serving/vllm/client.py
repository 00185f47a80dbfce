"""``VllmEngine``: serving.types.EngineClient over vLLM's AsyncLLM, so our HTTP layer (model ids
``<model>:<preset>``, our error format and metrics) can run on vLLM (``supernet serve --backend vllm``).

Each request's preset travels as ``SamplingParams.extra_args["preset"]`` (what ``vllm_xargs`` becomes), read by
the plugin's preset router; outputs stream as vLLM deltas and are converted to our ``RequestOutput``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.presets import PresetTable
from serving.sampling import SamplingParams, TokenLogprobs
from serving.types import (
    EngineError,
    EngineStopped,
    GenerationRequest,
    ModelInfo,
    RequestOutput,
    RequestTooLarge,
    SequenceDelta,
)
from supernet.placement import Placement, parse_placement

log = logging.getLogger("serving.vllm")


@dataclass
class VllmSettings:
    """Engine arguments the vLLM backend sets (everything else keeps vLLM's defaults)."""

    max_model_len: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    kv_cache_bytes: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    enforce_eager: bool = True  # torch.compile start-up takes minutes on CPU; opt in with compile=True
    seed: int = 0
    presets: str | dict[str, str] | None = None  # None: the checkpoint's presets.yaml, else the built-in set
    default_preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs field

    def engine_args(self, model_dir: str | Path):
        from vllm.engine.arg_utils import AsyncEngineArgs

        supernet: dict[str, Any] = {}
        if self.presets is not None:
            supernet["presets"] = str(self.presets) if isinstance(self.presets, Path) else self.presets
        if self.default_preset is not None:
            supernet["default"] = self.default_preset
        return AsyncEngineArgs(
            model=str(model_dir),
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_memory_bytes=self.kv_cache_bytes,
            tensor_parallel_size=self.tensor_parallel_size,
            dtype=self.dtype,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            additional_config={"supernet": supernet},
            disable_log_stats=True,
            **self.extra,
        )


def to_vllm_params(params: SamplingParams, preset: str, max_tokens: int):
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind

    return VllmParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,
        seed=params.seed,
        max_tokens=max_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"preset": preset},
    )


def to_logprobs(token_id: int, entries: dict, k: int) -> TokenLogprobs:
    """vLLM's {token: Logprob(logprob, rank)} (the chosen token plus the top ``k``) -> TokenLogprobs."""
    top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= k)
    chosen = entries[token_id].logprob
    return TokenLogprobs(token_id, chosen, [t for _, t, _ in top], [lp for _, _, lp in top])


class VllmStream:
    """One request's outputs from AsyncLLM.generate, converted; ``abort()`` cancels it in vLLM."""

    def __init__(self, engine: VllmEngine, request: GenerationRequest, params) -> None:
        self.engine, self.request, self.params = engine, request, params
        self.completion_tokens = 0
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        request, params = self.request, self.request.params
        prompt = {"prompt_token_ids": list(request.prompt_ids)}
        first = True
        async for out in self.engine.llm.generate(prompt, self.params, request.request_id):
            deltas = []
            for seq in out.outputs:
                logprobs = []
                if params.logprobs is not None and seq.logprobs:
                    logprobs = [
                        to_logprobs(t, entries, params.logprobs)
                        for t, entries in zip(seq.token_ids, seq.logprobs, strict=True)
                    ]
                self.completion_tokens += len(seq.token_ids)
                deltas.append(SequenceDelta(seq.index, list(seq.token_ids), seq.text, logprobs, seq.finish_reason))
            prompt_logprobs = None
            if first and params.prompt_logprobs is not None and out.prompt_logprobs is not None:
                prompt_logprobs = [
                    None if entries is None else to_logprobs(t, entries, params.prompt_logprobs)
                    for t, entries in zip(request.prompt_ids, out.prompt_logprobs, strict=True)
                ]
            first = False
            self.finished = out.finished
            yield RequestOutput(
                request.request_id,
                deltas,
                finished=out.finished,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=self.completion_tokens,
                prompt_logprobs=prompt_logprobs,
            )

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request.request_id)


class VllmEngine:
    """serving.types.EngineClient backed by vLLM (the supernet plugin model)."""

    def __init__(self, model_dir: str | Path, settings: VllmSettings, served_model_name: str, tokenizer: Any) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.settings = settings
        self.llm = AsyncLLM.from_engine_args(settings.engine_args(model_dir))
        config = self.llm.vllm_config.model_config
        from serving.vllm.config import plugin_options, served_presets

        presets: PresetTable = served_presets(
            model_dir, config.hf_config.num_hidden_layers, plugin_options(self.llm.vllm_config)
        )
        self.info = ModelInfo(
            served_model_name,
            config.max_model_len,
            presets,
            config.hf_config.num_hidden_layers,
            extra={"backend": "vllm"},
        )
        self.tokenizer = tokenizer
        self.accepting = True

    def placement(self, spec: str | Sequence[str]) -> Placement:
        return parse_placement(spec, self.info.num_layers)

    def submit(self, request: GenerationRequest) -> VllmStream:
        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        preset = self._preset_for(request)
        params = request.params
        params.validate()
        room = self.info.max_model_len - len(request.prompt_ids)
        if room < 1 or params.max_tokens > room:
            raise RequestTooLarge(
                f"prompt ({len(request.prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                f"model's context length ({self.info.max_model_len})"
            )
        return VllmStream(self, request, to_vllm_params(params, preset, params.max_tokens))

    def _preset_for(self, request: GenerationRequest) -> str:
        table = self.info.presets
        if request.preset in table.presets:
            return request.preset
        for preset in table.presets.values():  # an explicit placement equal to a served preset
            if preset.placement == tuple(request.placement):
                return preset.name
        raise EngineError(
            "the vLLM backend runs only the presets it registered caches for at start-up: " + ", ".join(table.names)
        )

    def abort(self, request_id: str) -> None:
        asyncio.get_running_loop().create_task(self.llm.abort(request_id))

    async def set_default_preset(self, name: str) -> list[str]:
        """Engine-wide switch of the preset requests without one run (see serving.vllm.router)."""
        if name not in self.info.presets.presets:
            raise EngineError(f"unknown preset {name!r}; available: {', '.join(self.info.presets.names)}")
        return await self.llm.collective_rpc("set_default_preset", args=(name,))

    def shutdown(self, timeout: float = 30.0) -> None:
        self.accepting = False
        self.llm.shutdown()
