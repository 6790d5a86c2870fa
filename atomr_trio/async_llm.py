"""AsyncLLM: the Trio-native handle to a running engine, and `open_engine`, which starts one.

Invariants:
- Prompts are tokenized and checked here, in the caller's task, before anything reaches the
  EngineCore: a bad prompt raises ValueError and costs the engine nothing.
- Whatever way `generate` ends — finished, stop string, error, or the consumer cancelled or
  walked away — the engine is told to abort the request from a shielded scope.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .engine.engine_config import EngineConfig, engine_config
from .engine.engine_core import EngineCore, EngineHandle
from .engine.messages import AddRequest, SeqDelta
from .engine.outbox import Outbox
from .model_source import ModelSource
from .outputs import RequestError, RequestOutput, RequestTracker
from .sampling_params import SamplingParams, listing
from .text.tokenizer import Tokenizer

PromptType = str | Sequence[int] | Mapping[str, Any]
_request_counter = itertools.count()


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
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"], add_special_tokens=add_special_tokens)
            raise ValueError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids'")
        if isinstance(prompt, Sequence):
            return None, self._check_ids(prompt)
        raise ValueError(f"a prompt must be a string, token ids or a dict, not {type(prompt).__name__}")

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool | None = None,
        *,
        continue_final_message: bool = False,
        documents: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> tuple[str | None, list[int]]:
        """(text, token ids) of a conversation rendered by the model's chat template.
        `add_generation_prompt` defaults to `not continue_final_message`; `add_special_tokens`
        adds the tokenizer's special tokens on top of what the template writes (vLLM's option)."""
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt, continue_final_message=continue_final_message,
            documents=documents, template_kwargs=chat_template_kwargs,
        )
        return text, self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, Sequence) or isinstance(ids, str):
            raise ValueError("prompt_token_ids must be a list of integers")
        out = list(ids)
        vocab = self.source.config.vocab_size
        bad = [f"[{i}] {t!r:.20}" for i, t in enumerate(out)
               if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); {len(bad)} are not: "
                             f"{listing(bad)}")
        return out

    def truncate_prompt(self, ids: list[int], k: int | None) -> list[int]:
        """The prompt's last `k` tokens (`SamplingParams.truncate_prompt_tokens`; -1: the context
        length), as vLLM keeps them; all of it when `k` is None."""
        if k is None:
            return ids
        max_len = self.config.max_model_len
        assert max_len is not None
        if k == -1:
            k = max_len
        if k > max_len:
            raise ValueError(f"truncate_prompt_tokens ({k}) is greater than max_model_len ({max_len}); "
                             "select a smaller truncation size")
        return ids[-k:]

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        max_len = self.config.max_model_len
        assert max_len is not None
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= max_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; this model's maximum context length is {max_len}"
            )
        params.check_for_model(self.source.config.vocab_size)

    # ---- requests ---------------------------------------------------------------------------
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
        params = params or SamplingParams()
        if prompt_ids is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_ids")
            text, ids = self.prepare_prompt(prompt)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), prompt_ids
        ids = self.truncate_prompt(ids, params.truncate_prompt_tokens)
        self.check_request(ids, params)
        rid = request_id or f"req-{next(_request_counter)}-{uuid.uuid4().hex[:8]}"
        outbox: Outbox[SeqDelta] = Outbox()
        tracker = RequestTracker(rid, text, ids, params, self.tokenizer, self.source.eos_token_ids)
        await self.engine.add(AddRequest(rid, ids, params, outbox))
        try:
            while not tracker.finished:
                for d in await outbox.get():
                    if tracker.apply(d):  # a stop string ended this sample
                        await self.engine.abort(rid, d.index, outbox)
                if tracker.error:
                    raise RequestError(tracker.error)
                yield tracker.delta_output() if delta else tracker.output()
        finally:
            # Idempotent: a no-op for a request the engine has already finished, and for one it
            # refused (the outbox says whose request it is).
            with trio.CancelScope(shield=True):
                await self.engine.abort(rid, outbox=outbox)

    async def generate_one(self, prompt: PromptType | None, params: SamplingParams | None = None,
                           **kw: Any) -> RequestOutput:
        """Run a request to the end and return its final output."""
        final: RequestOutput | None = None
        async for out in self.generate(prompt, params, **kw):
            final = out
        assert final is not None
        return final

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
    resolved = await trio.to_thread.run_sync(cfg.resolve, source.config)  # dtype=auto may probe kernels
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
