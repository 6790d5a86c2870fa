"""Request: the owner of one request in an engine (the Request actor of the tree), and the prompt
preparation every face shares (text or token ids or a conversation -> checked token ids).

Invariants:
- A Request is checked (`engine.validation.check_request`) when it is made, in its maker's task
  or thread, before anything reaches the engine: a bad request raises ValueError there and costs
  the engine nothing. Both faces (the library's AsyncLLM and the HTTP gateway) make requests
  only here.
- It runs once, in the task that iterates it: it sends AddRequest, reads the engine's deltas
  from its own Outbox through a RequestTracker (the only place its tokens become text), aborts a
  sample a stop string ended, and raises DeadlineExceeded when its deadline passes.
- Whatever way it ends — finished, a stop string, an engine error, the deadline, its consumer
  cancelled or walking away — it tells the engine to abort it from a shielded scope. The abort
  names its outbox, so it never touches another owner's request under the same id.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import trio

from .engine.messages import AddRequest, SeqDelta
from .engine.outbox import Outbox
from .engine.validation import check_request, token_ids
from .outputs import RequestError, RequestOutput, RequestTracker
from .sampling_params import SamplingParams
from .tools.conversation import with_tools

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

    from .engine.engine_config import EngineConfig
    from .engine.engine_core import EngineHandle
    from .model_source import ModelSource
    from .text.tokenizer import Tokenizer

PromptType = str | Sequence[int] | Mapping[str, Any]
_request_counter = itertools.count()


class DeadlineExceeded(Exception):
    """The request's deadline passed before it finished; the engine was told to abort it."""


# ---- prompts ---------------------------------------------------------------------------------
def prepare_prompt(source: ModelSource, prompt: PromptType,
                   add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
    """(text, token ids) for a string, a list of token ids, or {"prompt_token_ids": [...]}.
    Text gets the model's special tokens (BOS) unless `add_special_tokens` is false."""
    tokenizer, vocab = source.tokenizer, source.config.vocab_size
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), token_ids(prompt["prompt_token_ids"], vocab)
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], tokenizer.encode(prompt["prompt"], add_special_tokens=add_special_tokens)
        raise ValueError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids'")
    if isinstance(prompt, Sequence):
        return None, token_ids(prompt, vocab)
    raise ValueError(f"a prompt must be a string, token ids or a dict, not {type(prompt).__name__}")


def chat_prompt(
    tokenizer: Tokenizer,
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
    `tools` (OpenAI's list) reach the template, or a system prompt when it does not render
    them (tools.conversation), as do the conversation's tool calls and results."""
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    template = tokenizer.chat_template
    messages, tools = with_tools(messages, tools, template is not None and template.renders_tools)
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt, continue_final_message=continue_final_message,
        documents=documents, template_kwargs=chat_template_kwargs, tools=tools,
    )
    return text, tokenizer.encode(text, add_special_tokens=add_special_tokens)


def truncate_prompt(ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """The prompt's last `k` tokens (`SamplingParams.truncate_prompt_tokens`; -1: the context
    length), as vLLM keeps them; all of it when `k` is None. Idempotent."""
    if k is None:
        return ids
    if k == -1:
        k = max_model_len
    if k > max_model_len:
        raise ValueError(f"truncate_prompt_tokens ({k}) is greater than max_model_len ({max_model_len}); "
                         "select a smaller truncation size")
    return ids[-k:]


# ---- the owner -------------------------------------------------------------------------------
class Request:
    """One request for an engine with settings `config` serving `source`'s model: made (truncated
    to `params.truncate_prompt_tokens`, then checked) now — before any engine is chosen, so a
    server admits it only once it is known to be valid — and run on an engine by iterating
    `outputs(engine)` or awaiting `result(engine)`, once. `completion_must_fit`: see
    `check_request`."""

    def __init__(self, config: EngineConfig, source: ModelSource, ids: list[int], params: SamplingParams,
                 *, text: str | None = None, request_id: str | None = None,
                 completion_must_fit: bool = False) -> None:
        max_len = config.max_model_len
        assert max_len is not None
        self.prompt_ids = truncate_prompt(ids, params.truncate_prompt_tokens, max_len)
        check_request(self.prompt_ids, params, config, source.config.vocab_size,
                      completion_must_fit=completion_must_fit, kv_window=source.config.window_of_every_layer)
        self.request_id = request_id or f"req-{next(_request_counter)}-{uuid.uuid4().hex[:8]}"
        self.prompt, self.params = text, params
        self._source = source
        self._started = False
        self._grammar: CompiledGrammar | None = None

    async def prepare(self) -> None:
        """Compile the request's output constraint (params.structured_outputs), off the Trio loop
        and once per model and constraint; ValueError when it does not compile. `outputs` does
        it too: a server calls it first, so that a bad constraint costs no admission."""
        spec = self.params.structured_outputs
        if spec is not None and self._grammar is None:
            assert not isinstance(spec, dict)  # SamplingParams made it a StructuredOutputsParams
            self._grammar = await self._source.grammars.compile(spec)

    async def outputs(self, engine: EngineHandle, *, delta: bool = False, deadline: float = math.inf
                      ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs as `engine` produces them: cumulative, or only what is new
        (`delta`). Raises RequestError if the engine fails it, DeadlineExceeded at `deadline`
        (trio.current_time() clock). Each wait has its own cancel scope: nothing yields inside one."""
        if self._started:
            raise RuntimeError(f"request {self.request_id!r} already ran")
        self._started = True
        await self.prepare()
        rid = self.request_id
        outbox: Outbox[SeqDelta] = Outbox()
        tracker = RequestTracker(rid, self.prompt, self.prompt_ids, self.params, self._source.tokenizer,
                                 self._source.eos_token_ids)
        try:
            with trio.move_on_at(deadline) as sending:
                await engine.add(AddRequest(rid, self.prompt_ids, self.params, outbox, self._grammar))
            if sending.cancelled_caught:
                raise DeadlineExceeded
            while not tracker.finished:
                with trio.move_on_at(deadline) as waiting:
                    # The deadline holds even when deltas are always ready (get() then never waits).
                    await trio.lowlevel.checkpoint_if_cancelled()
                    for d in await outbox.get():
                        if tracker.apply(d):  # a stop string ended this sample
                            await engine.abort(rid, d.index, outbox)
                if waiting.cancelled_caught:
                    raise DeadlineExceeded
                if tracker.error:
                    raise RequestError(tracker.error)
                yield tracker.delta_output() if delta else tracker.output()
        finally:
            # Idempotent: a no-op for a request the engine has already finished, and for one it
            # refused (the outbox says whose request it is).
            with trio.CancelScope(shield=True):
                await engine.abort(rid, outbox=outbox)

    async def result(self, engine: EngineHandle, deadline: float = math.inf) -> RequestOutput:
        """Run the request on `engine` to its end and return its final output."""
        final: RequestOutput | None = None
        async with aclosing(self.outputs(engine, deadline=deadline)) as outputs:
            async for out in outputs:
                final = out
        assert final is not None
        return final
