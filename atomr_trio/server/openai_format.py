"""OpenAI's response shapes built from RequestOutputs: usage, logprobs (chat's and completions'),
prompt logprobs, model cards, and the bodies of non-streamed completions.

Invariant: pure functions of their arguments (no request, app or engine state), shaped exactly as
OpenAI's API and vLLM's server answer, so a client written for either reads them unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..runtime.deployment_state import DeploymentSnapshot
from ..text.tokenizer import Tokenizer
from .tool_calls import ToolMode, finish_reason, message_fields


def usage(outs: list[RequestOutput], completion: int | None = None) -> dict[str, Any]:
    """Usage of finished requests; a delta stream passes the completion tokens it counted."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    if completion is None:
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)}}


def usage_so_far(continuous: bool, prompt: int) -> Callable[[int], dict[str, Any]]:
    """`stream_options.continuous_usage_stats`, as vLLM does it: every chunk carries the usage of
    its choice so far (its prompt's tokens, the tokens generated for it until then)."""
    if not continuous:
        return lambda completion: {}
    return lambda completion: {"usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion}}


def model_card(dep: DeploymentSnapshot) -> dict[str, Any]:
    max_len = dep.max_model_len
    return {"id": dep.name, "object": "model", "created": 0, "owned_by": "atomr_trio", "max_model_len": max_len}


def text_of(message: dict[str, Any]) -> str:
    """A message's text (content parts joined), for `echo`."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _entries(o: CompletionOutput, k: int) -> list[tuple[Logprob, list[Logprob]]]:
    """(the sampled token's logprob, the top-k alternatives best first) for each token."""
    lps = o.logprobs or []
    tids = o.token_ids[len(o.token_ids) - len(lps):]
    return [(e[t], sorted((x for x in e.values() if (x.rank or 0) <= k), key=lambda x: x.rank or 0))
            for t, e in zip(tids, lps, strict=True)]


def as_token_ids(o: CompletionOutput, wanted: bool) -> CompletionOutput:
    """`return_tokens_as_token_ids`: each logprob's token reads "token_id:N", as in vLLM, so that
    tokens that are not whole characters stay identifiable."""
    if not wanted or o.logprobs is None:
        return o
    entries = [{t: replace(x, decoded_token=f"token_id:{t}") for t, x in e.items()} for e in o.logprobs]
    return replace(o, logprobs=entries)


def chat_logprobs(o: CompletionOutput, k: int) -> dict[str, Any]:
    def item(x: Logprob) -> dict[str, Any]:
        tok = x.decoded_token or ""
        return {"token": tok, "logprob": x.logprob, "bytes": list(tok.encode())}

    return {"content": [{**item(chosen), "top_logprobs": [item(x) for x in top]}
                        for chosen, top in _entries(o, k)]}


def _clamp(x: float) -> float:
    return max(x, -9999.0)  # as vLLM: JSON has no -inf


def prompt_logprobs(out: RequestOutput) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token {token_id: {logprob, rank, decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if e is None else {str(t): {"logprob": _clamp(x.logprob), "rank": x.rank,
                                            "decoded_token": x.decoded_token} for t, x in e.items()}
            for e in out.prompt_logprobs]


def completion_logprobs(tokenizer: Tokenizer, o: CompletionOutput, k: int,
                        prompt: tuple[list[int], list[dict[int, Logprob] | None] | None] | None = None,
                        offset: int = 0, as_ids: bool = False) -> dict[str, Any]:
    """OpenAI's completions logprobs for o's tokens, after the echoed prompt's (token ids and
    prompt logprobs, whose first entry is None: null). `top_logprobs` holds the token's own
    entry first, then the best others: k + 1 at most, as vLLM. `as_ids`
    (`return_tokens_as_token_ids`): tokens read "token_id:N"."""

    def text(tid: int, x: Logprob | None) -> str:
        return x.decoded_token or "" if x is not None else tokenizer.decode([tid], skip_special_tokens=False)

    def name(tid: int, x: Logprob | None) -> str:
        return f"token_id:{tid}" if as_ids else text(tid, x)

    pairs: list[tuple[int, dict[int, Logprob] | None]] = []
    if prompt is not None:
        ids, plp = prompt
        pairs.extend(zip(ids, plp or [None] * len(ids), strict=True))
    lps = o.logprobs or []
    pairs.extend(zip(o.token_ids[len(o.token_ids) - len(lps):], lps, strict=True))
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for tid, entry in pairs:
        text_offset.append(offset)
        if entry is None:
            tokens.append(name(tid, None))
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            tokens.append(name(tid, entry[tid]))
            token_logprobs.append(_clamp(entry[tid].logprob))
            top_logprobs.append({name(t, x): _clamp(x.logprob) for t, x in list(entry.items())[: k + 1]})
        offset += len(text(tid, entry[tid] if entry is not None else None))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_completion(rid: str, model: str, out: RequestOutput, role: str, echo: str, logprobs: int | None,
                    as_ids: bool, tools: ToolMode | None = None) -> dict[str, Any]:
    """A finished chat completion's body; with `tools`, calls read from each choice's text."""
    choices = []
    for o in out.outputs:
        message: dict[str, Any] = {"role": role, "content": echo + o.text}
        called = False
        if tools is not None:
            parsed = tools.parse(o.text)
            message = {"role": role, **message_fields(parsed)}
            called = bool(parsed.tool_calls)
        choices.append({
            "index": o.index,
            "message": message,
            "logprobs": chat_logprobs(as_token_ids(o, as_ids), logprobs) if logprobs is not None else None,
            "finish_reason": finish_reason(o.finish_reason, called),
        })
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage([out]),
            "prompt_logprobs": prompt_logprobs(out)}


def text_completion(rid: str, model: str, outs: list[RequestOutput], prefixes: list[str], n: int,
                    logprobs: int | None, echo: bool, as_ids: bool, tokenizer: Tokenizer) -> dict[str, Any]:
    """A finished completion's body: the choices of prompt i are i * n + their index; `prefixes`
    are the echoed prompts' texts."""
    choices = []
    for i, (out, prefix) in enumerate(zip(outs, prefixes, strict=True)):
        for o in out.outputs:
            choices.append({
                "index": i * n + o.index, "text": prefix + o.text,
                "logprobs": (completion_logprobs(tokenizer, o, logprobs,
                                                 (out.prompt_token_ids, out.prompt_logprobs) if echo else None,
                                                 as_ids=as_ids)
                             if logprobs is not None else None),
                "finish_reason": o.finish_reason,
                "prompt_logprobs": prompt_logprobs(out),
            })
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(outs)}
