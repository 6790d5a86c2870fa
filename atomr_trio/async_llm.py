"""AsyncLLM: the Trio-native handle to a running engine, and `open_engine`, which starts one.

Invariants:
- Prompts are tokenized and checked in the caller's task (or thread: `request` touches no Trio
  state), before anything reaches the EngineCore: a bad prompt raises ValueError and costs the
  engine nothing.
- Every request is run by its owner, a `request.Request`: whatever way `generate` ends —
  finished, stop string, error, or the consumer cancelled or walked away — the engine is told to
  abort the request from a shielded scope.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import trio

from .engine.engine_config import EngineConfig, engine_config
from .engine.engine_core import EngineCore, EngineHandle
from .executor.device_thread import run_on_own_thread
from .model_source import ModelSource
from .outputs import RequestOutput
from .request import PromptType, Request, chat_prompt, prepare_prompt
from .sampling_params import SamplingParams
from .text.tokenizer import Tokenizer

__all__ = ["AsyncLLM", "PromptType", "engine_config", "open_engine"]


class AsyncLLM:
    def __init__(self, engine: EngineHandle, source: ModelSource) -> None:
        self.engine = engine
        self.source = source
        self.model_name = source.name

    @property
    def tokenizer(self) -> Tokenizer:
        return self.source.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    # ---- prompts ----------------------------------------------------------------------------
    def prepare_prompt(self, prompt: PromptType, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(text, token ids) for a string, a list of token ids, or {"prompt_token_ids": [...]}.
        Text gets the model's special tokens (BOS) unless `add_special_tokens` is false."""
        return prepare_prompt(self.source, prompt, add_special_tokens)

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool | None = None,
        *,
        continue_final_message: bool = False,
        documents: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str | None, list[int]]:
        """(text, token ids) of a conversation rendered by the model's chat template.
        `add_generation_prompt` defaults to `not continue_final_message`; `add_special_tokens`
        adds the tokenizer's special tokens on top of what the template writes (vLLM's option);
        `tools` (OpenAI's function tools) are shown to the model."""
        return chat_prompt(self.tokenizer, messages, add_generation_prompt,
                           continue_final_message=continue_final_message, documents=documents,
                           chat_template_kwargs=chat_template_kwargs, add_special_tokens=add_special_tokens,
                           tools=tools)

    # ---- requests ---------------------------------------------------------------------------
    def request(self, prompt: PromptType | None, params: SamplingParams | None = None,
                request_id: str | None = None, *, prompt_ids: list[int] | None = None) -> Request:
        """A checked request, not yet sent (ValueError for a bad one). `prompt_ids`, when given,
        are the prompt's tokens (`prompt` is then only its text, or None)."""
        if prompt_ids is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_ids")
            text, ids = self.prepare_prompt(prompt)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), prompt_ids
        return Request(self.engine.config, self.source, ids, params or SamplingParams(), text=text,
                       request_id=request_id)

    async def generate(
        self,
        prompt: PromptType | None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        delta: bool = False,
        prompt_ids: list[int] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs: cumulative by default, or only what is new (`delta`)."""
        request = self.request(prompt, params, request_id, prompt_ids=prompt_ids)
        async with aclosing(request.outputs(self.engine, delta=delta)) as outputs:
            async for out in outputs:
                yield out

    async def generate_one(self, prompt: PromptType | None, params: SamplingParams | None = None,
                           request_id: str | None = None, *, prompt_ids: list[int] | None = None) -> RequestOutput:
        """Run a request to the end and return its final output."""
        return await self.request(prompt, params, request_id, prompt_ids=prompt_ids).result(self.engine)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def abort_all(self) -> None:
        """End every request of this engine now (each gets finish_reason "abort")."""
        await self.engine.abort_all()

    def stats(self) -> dict[str, Any]:
        """The engine's latest snapshot, as a dict (the worker's under "worker")."""
        return self.engine.snapshot().as_dict()


@asynccontextmanager
async def open_engine(
    model: str | ModelSource | None = None, config: EngineConfig | None = None, **kwargs: Any
) -> AsyncIterator[AsyncLLM]:
    """Load a model (a path, the default model, or an already opened ModelSource) and run its
    EngineCore in a nursery owned by this context manager."""
    cfg = engine_config(config, **kwargs)
    source = model if isinstance(model, ModelSource) else await trio.to_thread.run_sync(ModelSource.open, model)
    # dtype=auto may probe kernels: on a thread that ends with the probe (run_on_own_thread)
    resolved = await run_on_own_thread(lambda: cfg.resolve(source.config), "resolve")
    core = EngineCore(source, resolved)
    try:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(core.run)
            try:
                yield AsyncLLM(handle, source)
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One failure (a model that cannot load, an error in the body) reads best unwrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
