"""OpenAI request bodies (pydantic, validated at the edge) and the error shape.

Invariant: a body that validates here maps onto SamplingParams without surprises, and nothing a
client sends is silently dropped. Every top-level field is one of:
- honoured: a field of the models below;
- refused with a 400 naming it (`check()`): a feature of vLLM or OpenAI this server does not
  implement (beam search, logits processors, ...), whenever it is set to anything but its
  no-op value (`REFUSED`);
- ignored (`IGNORED`): fields OpenAI clients send routinely that change nothing in the output
  (`metadata`, `store`, `service_tier`, ...);
- unknown: refused with a 400 as well, so that a misspelt parameter is never mistaken for one
  that took effect.
A field set to null counts as absent. Chat messages pass every key through to the chat template,
as transformers does, except `function_call` and `audio`, which are refused.
Output constraints come from one of `response_format`, `structured_outputs` or vLLM's older
`guided_*` fields (`constraint()`), and for chat from `tool_choice` "required" or a named
function; giving two is a 400 naming the second.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..grammar.spec import StructuredOutputsParams
from ..sampling_params import SamplingParams
from ..text.chat_template import RESERVED_VARIABLES
from ..tools.prompting import check_tools

MAX_MESSAGES = 1024  # messages in one chat request
MAX_PROMPTS = 256  # prompts in one completions request
MAX_REQUEST_ID = 256  # characters of a client-given request id

# Known fields this server does not implement: refused when set to anything but their no-op value.
REFUSED: dict[str, str] = {
    "structural_tag": "give it as structured_outputs.structural_tag or response_format",
    "guided_whitespace_pattern": "JSON whitespace is compact, or free with "
                                 "structured_outputs.disable_any_whitespace=false",
    "guided_decoding_backend": "xgrammar is the only structured-output backend",
    "logits_processors": "custom logits processors are not supported",
    "allowed_token_ids": "restricting the vocabulary is not implemented",
    "bad_words": "banned words are not implemented",
    "cache_salt": "the prefix cache is shared and not salted per request",
    "kv_transfer_params": "there is no disaggregated serving",
    "vllm_xargs": "there are no request extensions",
    "mm_processor_kwargs": "there is no multimodal input",
    "media_io_kwargs": "there is no multimodal input",
    "prompt_embeds": "prompts are text or token ids",
    "return_token_ids": "responses carry text (and logprobs), not token ids",
    "max_repetition_pattern_size": "repetition detection is not implemented",
    "min_repetition_pattern_size": "repetition detection is not implemented",
    "repetition_min_count": "repetition detection is not implemented",
    "include_reasoning": "there is no reasoning parser; reasoning stays in the content",
    "functions": "the deprecated functions API is not implemented; use tools",
    "function_call": "the deprecated functions API is not implemented; use tool_choice",
    "audio": "there is no audio output",
    "modalities": "the only output modality is text",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "there is no web search",
    "verbosity": "the model has no verbosity control",
}
# Values of a REFUSED field that ask for nothing (besides null, false and empty containers).
_NO_OP: dict[str, Any] = {
    "max_repetition_pattern_size": 0, "min_repetition_pattern_size": 0, "repetition_min_count": 0,
    "include_reasoning": True, "modalities": ["text"],
}
# Fields clients send routinely that change nothing in the output: accepted and ignored.
IGNORED = frozenset({
    "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention",
})


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def unsupported(name: str, why: str = "") -> APIError:
    return APIError(400, f"'{name}' is not supported by this server yet" + (f" ({why})" if why else ""),
                    param=name)


def _is_set(name: str, value: Any) -> bool:
    """Whether a field asks for something: not null, not its no-op value (false or empty, unless
    _NO_OP says otherwise)."""
    if value is None:
        return False
    if name in _NO_OP:
        return bool(value != _NO_OP[name])
    return not (value is False or (isinstance(value, (list, dict, str)) and not value))


def check_request_id(value: str, where: str) -> None:
    """A client-given request id (logs, engine ids, the response's id) must be short and printable."""
    if not 1 <= len(value) <= MAX_REQUEST_ID or not value.isprintable():
        raise APIError(400, f"{where} must be 1 to {MAX_REQUEST_ID} printable characters",
                       param="request_id" if where == "request_id" else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # every chunk carries its choice's usage so far


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked in check(), never dropped

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted; it changes nothing
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens; -1: the context length
    priority: int = 0  # lower runs first
    request_id: str | None = None  # the X-Request-Id header wins, as in vLLM
    return_tokens_as_token_ids: bool = False  # logprob tokens read "token_id:N"
    best_of: int | None = None  # honoured when equal to n
    use_beam_search: bool = False
    length_penalty: float = 1.0  # beam search only
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    # constraint(), read once: check() and the route both ask for it
    _constraint: tuple[StructuredOutputsParams | None] | None = PrivateAttr(default=None)

    def constraint(self) -> StructuredOutputsParams | None:
        """The body's output constraint, if it asks for one (a 400 for a bad or a second one)."""
        if self._constraint is None:
            self._constraint = (self._read_constraint(),)
        return self._constraint[0]

    def _read_constraint(self) -> StructuredOutputsParams | None:
        found: list[StructuredOutputsParams] = []
        rf = self.response_format
        if rf is not None:
            found.extend(_from_response_format(rf))
        if self.structured_outputs is not None:
            fields = {k: v for k, v in self.structured_outputs.items() if k not in _SO_NO_OP}
            found.append(_structured("structured_outputs", **fields))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                found.append(_structured(f"guided_{kind}", **{kind: value}))
        if len(found) > 1:
            raise APIError(400, f"give one output constraint, not {found[0].param} and {found[1].param}",
                           param=found[1].param)
        return found[0] if found else None

    def check(self) -> None:
        """Refuse what this server does not implement (a 400 naming the field)."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED or not _is_set(name, value):
                continue
            if name in REFUSED:
                raise unsupported(name, REFUSED[name])
            shown = name if len(name) <= 100 else name[:100] + "..."  # the body may be megabytes
            raise APIError(400, f"'{shown}' is not a parameter this server knows", param=shown)
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "every sample generated is returned, so best_of must equal n")
        if self.use_beam_search:
            raise unsupported("use_beam_search", "beam search is not implemented")
        if self.length_penalty != 1.0:
            raise unsupported("length_penalty", "it applies to beam search, which is not implemented")
        self.constraint()  # a 400 now for a malformed one
        if self.truncate_prompt_tokens is not None and not (
                self.truncate_prompt_tokens == -1 or self.truncate_prompt_tokens >= 1):
            raise APIError(400, f"truncate_prompt_tokens must be -1 (the context length) or >= 1, got "
                                f"{self.truncate_prompt_tokens}", param="truncate_prompt_tokens")
        if self.request_id is not None:
            check_request_id(self.request_id, "request_id")

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self) -> Any:
        if self.stream and self.prompt_logprobs:  # as vLLM: a stream has no place for them
            raise APIError(400, "`prompt_logprobs` are not available when `stream=True`.",
                           param="prompt_logprobs")
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                min_p=self.min_p, seed=self.seed, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                logit_bias=dict(self.logit_bias) if self.logit_bias else None,  # type: ignore[arg-type]
                max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                truncate_prompt_tokens=self.truncate_prompt_tokens, priority=self.priority,
                structured_outputs=constraint,
            )
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from e


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # other keys go to the chat template as they are
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class TokenizeChat(BaseModel):
    """The conversation of a /tokenize body (its other keys are read by the route)."""

    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # False: one call at most (tool_choice "required")
    echo: bool = False  # prepend the last message when the reply has its role
    add_generation_prompt: bool | None = None  # default: not continue_final_message
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None  # handed to the chat template, as vLLM does

    def check(self) -> None:
        super().check()
        try:
            check_tools(self.tools, self.tool_choice)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":", 1)[0]) from None
        if self.tool_choice not in (None, "none", "auto") and self.constraint() is not None:
            raise APIError(400, "tool_choice 'required' or a named function constrains the output itself; "
                                "it cannot be combined with another output constraint", param="tool_choice")
        if self.chat_template:
            raise unsupported("chat_template", "a template runs on the server, so only the model's own "
                                               "template is used; vLLM refuses it too unless trusted")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           param="continue_final_message")
        for key in RESERVED_VARIABLES:
            if key in (self.chat_template_kwargs or {}):
                raise APIError(400, f"chat_template_kwargs must not hold '{key}'"
                               + ("" if key == "messages" else f": give '{key}' as a top-level field"),
                               param="chat_template_kwargs")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "when using `top_logprobs`, `logprobs` must be set to true", param="top_logprobs")
        for i, m in enumerate(self.messages):
            for key in ("function_call", "audio"):
                if _is_set(key, (m.model_extra or {}).get(key)):
                    raise unsupported(f"messages.{i}.{key}", "use tool_calls" if key != "audio"
                                      else "there is no audio input")

    @property
    def generation_prompt(self) -> bool:
        if self.add_generation_prompt is None:
            return not self.continue_final_message
        return self.add_generation_prompt

    def template_kwargs(self) -> dict[str, Any]:
        extra = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            extra.setdefault("reasoning_effort", self.reasoning_effort)
        return extra


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0 (with echo): score the prompt only
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _generates_unless_echoed(self) -> Any:
        if self.max_tokens == 0 and not self.echo:  # vLLM's answer too
            raise APIError(400, "max_tokens must be at least 1, got 0.", param="max_tokens")
        return self

    @property
    def prompt_logprobs_k(self) -> int | None:
        """vLLM's rule: `prompt_logprobs`, or with `echo` the `logprobs` asked for the output."""
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    @field_validator("prompt")
    @classmethod
    def _few_prompts(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise unsupported("suffix")


# vLLM's structured_outputs fields that ask for what happens here anyway: no fallback backend,
# JSON objects closed to undeclared properties (strict schemas).
_SO_NO_OP = ("disable_fallback", "disable_additional_properties", "backend", "_backend")


def _structured(param: str, **fields: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields, param=param)
    except TypeError as e:
        unknown = str(e).split("argument", 1)[-1].strip(" '")
        raise APIError(400, f"{param}: '{unknown}' is not a field of it", param=param) from None
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def _from_response_format(rf: dict[str, Any]) -> list[StructuredOutputsParams]:
    """OpenAI's response_format: text (no constraint), json_object, json_schema; vLLM's
    structural_tag."""
    kind = rf.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [_structured("response_format", json_object=True)]
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec and "json_schema" not in spec:
            raise APIError(400, "response_format: json_schema needs {'name': ..., 'schema': {...}}",
                           param="response_format")
        return [_structured("response_format", json=spec.get("schema", spec.get("json_schema")))]
    if kind == "structural_tag":
        return [_structured("response_format", structural_tag=rf)]
    raise APIError(400, f"response_format: type must be 'text', 'json_object', 'json_schema' or "
                        f"'structural_tag', got {kind!r}", param="response_format")


def _param_of(message: str) -> str | None:
    """The parameter a SamplingParams error names (its messages start with the name)."""
    head = message.split(" ", 1)[0]
    return head if head.replace("_", "").isalpha() else None
