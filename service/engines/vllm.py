"""The `vllm` engine: one AsyncLLM, weights swapped in place through a worker extension.

`VLLM_ENABLE_V1_MULTIPROCESSING=0` is set before vLLM is imported: AsyncLLM
still runs its engine core in a child process (that is how vLLM's async client
works), but the model worker then lives inside that core process instead of a
third one.  Swaps go through `collective_rpc` to `SwapWorkerExtension`, which
opens the safetensors files by path.  The engine core handles an RPC between two
steps, after every abort sent before it, so a swap never meets a forward pass.
After a swap the prefix cache is reset: no KV block computed under the old
weights is ever reused.  The same code runs on a GPU with the `vllm` package.

Per-request adapters (`max_loras` > 0): vLLM's LoRA support is enabled on the
decoder blocks' Linear modules, and d2lora's plugin (service/engines/lora/)
gives its LoRA layers the row scale of D²-LoRA / DoRA, so a request naming an
`AdapterRef` is served by exactly its fused weights while sharing the batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from service.engines.base import (
    OPTIONAL_FEATURES,
    AdapterRef,
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    StructuredOutput,
    TensorFile,
    TokenLogprob,
)
from service.engines.context import resolve_max_model_len
from service.engines.tokenizer import ChatTokenizer
from service.engines.weights import BaseTensors

if TYPE_CHECKING:
    from vllm.logprobs import Logprob
    from vllm.sampling_params import StructuredOutputsParams

WORKER_EXTENSION = "service.engines.vllm_worker.SwapWorkerExtension"


def configure_environment(kv_cache_gib: int) -> None:
    """vLLM reads these when it is imported and when the engine starts."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["D2LORA_VLLM_PLUGIN"] = "1"  # service.engines.lora.register: our plugin in every vLLM process
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


def sampling_params(options: SamplingOptions):
    """vLLM's SamplingParams for the options, as vLLM's own OpenAI server maps a request."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=options.n,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=options.seed,
        stop=list(options.stop),
        top_k=options.top_k,
        min_p=options.min_p,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty,
        logit_bias=dict(options.logit_bias) or None,
        stop_token_ids=list(options.stop_token_ids) or None,
        ignore_eos=options.ignore_eos,
        min_tokens=options.min_tokens,
        logprobs=options.logprobs,
        prompt_logprobs=options.prompt_logprobs,
        structured_outputs=structured_outputs(options.structured_output),
        output_kind=RequestOutputKind.DELTA,
    )


def structured_outputs(constraint: StructuredOutput | None) -> StructuredOutputsParams | None:
    """vLLM's structured-outputs backend (xgrammar, guidance as its fallback: `auto`) for the constraint."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=json.loads(constraint.json_schema or "{}"))


def token_logprob(token_id: int, entries: Mapping[int, Logprob], top_k: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} of one position (the token itself and the top_k most likely) as a TokenLogprob."""
    own = entries[token_id]
    top = sorted(((lp.rank, t, lp.logprob) for t, lp in entries.items() if lp.rank is not None and lp.rank <= top_k))
    return TokenLogprob(token_id, own.logprob, own.rank or 1, tuple((t, logprob) for _, t, logprob in top))


def logprobs_of(
    token_ids: Sequence[int], positions: Sequence[Mapping[int, Logprob] | None] | None, top_k: int | None
) -> tuple[TokenLogprob | None, ...] | None:
    """One TokenLogprob per token (None where vLLM has none: the prompt's first token); None when not asked."""
    if top_k is None or positions is None:
        return None
    return tuple(
        None if entries is None else token_logprob(token, entries, top_k)
        for token, entries in zip(token_ids, positions, strict=True)
    )


def packed_siblings(name: str, packed: dict[str, list[str]]) -> set[str]:
    """Module paths that vLLM loads as one with `name`'s module (itself included)."""
    module = name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    groups = [parts for parts in packed.values() if leaf in parts]
    return {f"{parent}.{part}" for parts in groups for part in parts} | {module}


def lora_request(adapter: AdapterRef):
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.id, lora_path=str(adapter.path))


class VllmEngine(Engine):
    name = "vllm"
    features = OPTIONAL_FEATURES
    per_request_adapters = True

    async def start(self, base_dir: Path) -> None:
        configure_environment(self.settings.kv_cache_gib)
        if self.adapter_slots:
            from service.engines.lora.versions import check_vllm

            check_vllm()  # one line, before vLLM starts, when its internals are not the ones the plugin patches
        from vllm.v1.engine.async_llm import AsyncLLM

        from service.engines.vllm_stats import EngineStats  # imports vLLM: after its environment is set

        self.base = BaseTensors(base_dir)
        self.tokenizer = ChatTokenizer(base_dir)
        self.stats = EngineStats(observer=self._notify_step)
        self.llm = AsyncLLM.from_engine_args(self._engine_args(base_dir), stat_loggers=[self.stats.logger_factory()])
        (self.packed,) = await self.llm.collective_rpc("d2lora_packed_modules")
        if self.adapter_slots:
            await self._check_plugin()

    async def _check_plugin(self) -> None:
        (installed,) = await self.llm.collective_rpc("d2lora_lora_plugin")
        if not installed:
            self.llm.shutdown()
            raise RuntimeError("the vLLM worker runs without d2lora's LoRA plugin: per-request adapters would be wrong")

    @property
    def adapter_modules(self) -> list[str]:
        """Leaf names of the modules a per-request adapter may target (q_proj, ..., down_proj)."""
        return self.base.layer_linear_names()

    def _engine_args(self, base_dir: Path):
        from vllm import AsyncEngineArgs

        s = self.settings
        return AsyncEngineArgs(
            model=str(base_dir),
            dtype=s.dtype,
            enforce_eager=True,
            seed=0,
            max_model_len=resolve_max_model_len(s, base_dir),
            max_num_seqs=s.max_num_seqs,
            gpu_memory_utilization=s.gpu_memory_utilization,
            tensor_parallel_size=s.tensor_parallel_size,
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
            **self._lora_args(),
        )

    @property
    def kv_cache_usage(self) -> float:
        """vLLM's own figure, from the SchedulerStats of its latest step (service/engines/vllm_stats.py)."""
        return self.stats.kv_cache_usage

    def _lora_args(self) -> dict:
        s = self.settings
        if not self.adapter_slots:
            return {}
        return {
            "enable_lora": True,
            "max_loras": s.max_loras,
            "max_cpu_loras": s.adapter_cache_size,
            "max_lora_rank": s.max_lora_rank,
            "lora_target_modules": self.adapter_modules,
        }

    async def load_weights(self, files: Sequence[TensorFile]) -> None:
        complete = [*files, *self.base.slices(self._missing_parts(files))]
        await self.llm.collective_rpc("d2lora_load", args=([(str(f.path), list(f.names)) for f in complete],))
        await self.llm.reset_prefix_cache()

    def _missing_parts(self, files: Sequence[TensorFile]) -> set[str]:
        """Base tensors of the packed modules touched but not named (e.g. k/v when only q changes)."""
        named = {name for f in files for name in f.names}
        modules = set().union(*(packed_siblings(name, self.packed) for name in named))
        needed = {name for name in self.base.files if name.rpartition(".")[0] in modules}
        return needed - named

    async def add_adapter(self, adapter: AdapterRef) -> None:
        self.check_adapter(GenerationRequest("", "", SamplingOptions(), adapter=adapter))
        if not await self.llm.add_lora(lora_request(adapter)):
            raise ValueError(f"adapter {adapter.name}: vLLM did not load {adapter.path}")

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        if self.adapter_slots:
            await self.llm.remove_lora(adapter.id)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.check_adapter(request)
        options = request.sampling
        from vllm.inputs import TextPrompt, TokensPrompt

        prompt: TextPrompt | TokensPrompt = (
            TextPrompt(prompt=request.prompt)
            if request.prompt_token_ids is None
            else TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        )
        stream = self.llm.generate(
            prompt,
            sampling_params(options),
            request.request_id,
            lora_request=lora_request(request.adapter) if request.adapter is not None else None,
        )
        prompt_sent = False
        async for output in stream:
            prompt_ids = tuple(output.prompt_token_ids or ())
            for choice in output.outputs:
                token_ids = tuple(choice.token_ids)
                logprobs = logprobs_of(token_ids, choice.logprobs, options.logprobs)
                yield GenerationChunk(
                    index=choice.index,
                    text=choice.text,
                    new_tokens=len(token_ids),
                    prompt_tokens=len(prompt_ids),
                    finish_reason=choice.finish_reason,
                    token_ids=token_ids,
                    logprobs=None if logprobs is None else tuple(lp for lp in logprobs if lp is not None),
                    prompt_token_ids=None if prompt_sent else prompt_ids,
                    prompt_logprobs=None
                    if prompt_sent
                    else logprobs_of(prompt_ids, output.prompt_logprobs, options.prompt_logprobs),
                )
                prompt_sent = True

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    @property
    def alive(self) -> bool:
        return not self.llm.errored  # vLLM's monitor sets this when the engine-core process dies

    async def stop(self) -> None:
        self.llm.shutdown()
