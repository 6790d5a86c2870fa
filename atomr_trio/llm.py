"""LLM: the synchronous library API, in vLLM's shape, for scripts and notebooks.

Invariants:
- The actor tree runs in its own Trio run on a background thread owned by this object, so the
  API works from plain scripts and from code already inside an asyncio loop (a Jupyter cell).
- Arguments are checked and prompts tokenized in the caller's thread: mistakes raise there.
- `close()` (or leaving the `with` block) ends the way the server's drain does: in-flight
  calls may finish for `timeout` seconds, then every remaining request ends with finish_reason
  "abort" (`generate` returns those outputs, `stream` iterators stop); then the tree is
  cancelled and the thread joined. New calls raise RuntimeError as soon as closing begins.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from typing import Any

import sniffio
import trio

from .async_llm import AsyncLLM, PromptType, engine_config, open_engine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, **engine_settings: Any) -> None:
        self._cfg = engine_config(**engine_settings)
        self._model = model
        self._engine: AsyncLLM | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._closing = False
        self._drain_s = 0.0
        self._inflight = 0  # generate/chat batches and stream producers running in the Trio thread
        self._idle: trio.Event  # set while nothing is in flight (made in the Trio thread)
        self._streams: trio.Nursery
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="atomr-llm", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor's thread
            if not self._ready.is_set():
                self._error = e
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with open_engine(self._model, self._cfg) as engine, trio.open_nursery() as streams:
            self._engine = engine
            self._streams = streams  # where `stream()` runs its requests
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._idle = trio.Event()
            self._idle.set()
            self._ready.set()
            await self._stop.wait()
            with trio.move_on_after(self._drain_s):
                while self._inflight:
                    await self._idle.wait()
            with trio.move_on_after(30):
                while self._inflight:  # again and again: a request may reach the engine late
                    await engine.abort_all()
                    with trio.move_on_after(0.05):
                        await self._idle.wait()
            streams.cancel_scope.cancel()

    # ---- info -------------------------------------------------------------------------------
    @property
    def engine(self) -> AsyncLLM:
        if self._engine is None or self._token is None or self._closing or not self._thread.is_alive():
            raise RuntimeError("this LLM is closed")
        return self._engine

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def stats(self) -> dict[str, Any]:
        return dict(self._call_sync(self.engine.stats))

    def __repr__(self) -> str:
        if self._engine is None:
            return "LLM(closed)"
        c = self._engine.config
        return (f"LLM(model={self._engine.model_name!r}, dtype={c.dtype}, device={c.device}, "
                f"max_model_len={c.max_model_len}, kv_blocks={c.num_kv_blocks}x{c.resolved_block_size()})")

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        engine = self.engine
        items = [engine.prepare_prompt(p) for p in _as_prompt_list(prompts)]
        return self._run_batch(items, sampling_params, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate. With
        `continue_final_message` the last message is left open for the model to continue
        (`add_generation_prompt` then defaults to false); `chat_template_kwargs` are template
        variables; `tools` (OpenAI's function tools) are shown to the model — to make it call
        one, constrain the output (`SamplingParams(structured_outputs=...)`, e.g.
        `tools.prompting.required_constraint(tools)`)."""
        engine = self.engine
        one = bool(messages) and isinstance(messages[0], Mapping)
        conversations: list[Any] = [messages] if one else list(messages)
        items = [engine.chat_prompt(list(c), add_generation_prompt, continue_final_message=continue_final_message,
                                    chat_template_kwargs=chat_template_kwargs, tools=tools)
                 for c in conversations]
        return self._run_batch(items, sampling_params, use_tqdm)

    def _run_batch(
        self,
        items: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        engine = self.engine
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"got {len(params)} sampling params for {len(items)} prompts")
        requests = [engine.request(text, p, prompt_ids=ids) for (text, ids), p in zip(items, params, strict=True)]
        results: list[RequestOutput | None] = [None] * len(items)
        bar = _progress(len(items)) if use_tqdm and items else None

        async def one(i: int) -> None:
            results[i] = await requests[i].result(engine.engine)
            if bar is not None:
                bar.update(1)
                out_tokens = sum(len(o.token_ids) for r in results if r for o in r.outputs)
                elapsed = bar.format_dict.get("elapsed") or 0.0
                if elapsed:
                    bar.set_postfix_str(f"output {out_tokens / elapsed:.1f} tok/s", refresh=False)

        async def run_all() -> None:
            with self._in_flight():
                for r in requests:  # a constraint that does not compile raises here, before any runs
                    await r.prepare()
                async with trio.open_nursery() as nursery:
                    for i in range(len(items)):
                        nursery.start_soon(one, i)

        try:
            self._call(run_all)
        finally:
            if bar is not None:
                bar.close()
        return [r for r in results if r is not None]

    def stream(
        self, prompt: PromptType | Conversation, sampling_params: SamplingParams | None = None
    ) -> Generator[str, None, None]:
        """Text deltas of one request as they are generated (a prompt, or chat messages).
        Stopping the iteration early aborts the request."""
        engine = self.engine
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], Mapping):
            text, ids = engine.chat_prompt(list(prompt))
        else:
            text, ids = engine.prepare_prompt(prompt)  # type: ignore[arg-type]
        request = engine.request(text, sampling_params, prompt_ids=ids)
        deltas: queue.SimpleQueue[str | BaseException | None] = queue.SimpleQueue()
        scope = trio.CancelScope()

        async def produce() -> None:
            try:
                with self._in_flight(), scope:
                    async with aclosing(request.outputs(engine.engine, delta=True)) as outputs:
                        async for out in outputs:
                            if out.outputs[0].text:
                                deltas.put(out.outputs[0].text)
            except Exception as e:  # noqa: BLE001 - handed to the consumer's thread
                deltas.put(e)
            finally:
                deltas.put(None)  # also when the tree is cancelled: the consumer never hangs

        self._call_sync(self._streams.start_soon, produce)
        try:
            while (item := deltas.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self._token is not None and self._thread.is_alive():
                try:
                    trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
                except trio.RunFinishedError:
                    pass

    async def astream(
        self, prompt: PromptType | Conversation, sampling_params: SamplingParams | None = None
    ) -> AsyncIterator[str]:
        """`stream()` for async code: works under asyncio (a notebook cell's top-level await)
        and under Trio; waiting happens in a worker thread, never blocking the caller's loop."""
        it = self.stream(prompt, sampling_params)
        done = object()
        library = sniffio.current_async_library()
        try:
            while True:
                if library == "trio":
                    item = await trio.to_thread.run_sync(next, it, done)
                else:
                    import asyncio

                    item = await asyncio.to_thread(next, it, done)
                if item is done:
                    return
                yield item  # type: ignore[misc]
        finally:
            it.close()

    # ---- lifecycle --------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any) -> Any:
        _ = self.engine  # raises when closed
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def _call_sync(self, fn: Any, *args: Any) -> Any:
        _ = self.engine  # raises when closed
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Count a batch or stream producer as in flight (Trio thread only), for close()."""
        if not self._inflight:
            self._idle = trio.Event()
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    def close(self, timeout: float = 0.0) -> None:
        """Stop the engine. Calls in flight in other threads get `timeout` seconds to finish;
        what is still running then ends with finish_reason "abort"."""
        self._closing = True
        self._drain_s = timeout
        if self._stop is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join()
        self._engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    seq = list(prompts)
    if seq and all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
        return [prompts]  # type: ignore[list-item]  # one prompt given as token ids
    return seq  # type: ignore[return-value]


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
