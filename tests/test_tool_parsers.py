"""Tool calling (atomr_trio.tools): each parser reads its format's calls and gives malformed ones
back as content; streams of any split agree with the whole parse; the tool_choice constraints
admit exactly the calls they should; check_tools names the parameter at fault."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from atomr_trio.tools.calls import ParsedOutput, StreamDelta, ToolCall, new_call_id
from atomr_trio.tools.parsers import PARSERS, ToolParser, get_parser
from atomr_trio.tools.prompting import check_tools, named_constraint, required_constraint, tools_system_prompt

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: any object
]
SIZES = [1, 2, 3, 7, None]  # None: the whole text in one piece


def calls_of(out: ParsedOutput) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


def run_stream(parser: ToolParser, text: str, size: int | None) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Streams `text` in pieces of `size`: (content joined, [(name, arguments)], content pieces)."""
    stream = parser.stream(TOOLS)
    pieces = [text] if size is None else [text[i:i + size] for i in range(0, len(text), size)]
    deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
    content_pieces = [d.content for d in deltas if d.content]
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        for td in delta.tool_calls:
            if td.index not in calls:  # the first delta of a call: id and name, no arguments yet
                assert td.index == len(calls)
                assert td.id is not None and td.id.startswith("call_") and td.name and td.arguments == ""
                calls[td.index] = [td.name, ""]
            else:
                assert td.id is None and td.name is None
                calls[td.index][1] += td.arguments
    return "".join(content_pieces), [(n, a) for n, a in calls.values()], content_pieces


def hermes_call(name: str, args: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


# (parser, text, expected content, expected calls); expected calls [] means the text is content.
CASES: list[tuple[str, str, str | None, list[tuple[str, Any]]]] = [
    # hermes
    ("hermes", "The weather is fine.", "The weather is fine.", []),
    ("hermes", "", "", []),
    ("hermes", hermes_call("get_weather", {"city": "Paris"}), None, [("get_weather", {"city": "Paris"})]),
    ("hermes", "\n  " + hermes_call("get_time", {}) + "\n", None, [("get_time", {})]),
    ("hermes", "Let me check.\n" + hermes_call("get_weather", {"city": "Zürich", "unit": "c"}) + "\n"
     + hermes_call("get_time", {"tz": "CET"}), "Let me check.\n",
     [("get_weather", {"city": "Zürich", "unit": "c"}), ("get_time", {"tz": "CET"})]),
    ("hermes", '<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", {})]),  # no arguments
    ("hermes", '<tool_call>{"name": "get_time", "parameters": {"a": 1}}</tool_call>', None,
     [("get_time", {"a": 1})]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "</tool_call>"}}</tool_call>', None,
     [("get_weather", {"city": "</tool_call>"})]),  # the end marker inside a JSON string
    ("hermes", "\u00a0\f" + hermes_call("get_time", {}), "\u00a0\f", [("get_time", {})]),  # not JSON whitespace
    ("hermes", "a < b and <tool_ is not a call", "a < b and <tool_ is not a call", []),
    ("hermes", "ends with a marker start <tool_c", "ends with a marker start <tool_c", []),
    # hermes, malformed: the whole text is content
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>', None, []),
    ("hermes", hermes_call("get_stock", {"s": "X"}), None, []),  # unknown function
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', None, []),  # unclosed
    ("hermes", hermes_call("get_weather", "Paris"), None, []),  # arguments not an object
    ("hermes", hermes_call("get_weather", ["Paris"]), None, []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', None, []),  # no name
    ("hermes", '<tool_call>["get_time"]</tool_call>', None, []),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {"x": NaN}}</tool_call>', None, []),
    ("hermes", hermes_call("get_time", {}) + " and then some text", None, []),
    ("hermes", hermes_call("get_time", {}) + "\n" + hermes_call("nope", {}), None, []),  # one bad call
    ("hermes", '<tool_call>{"name": "get_time"} {"name": "get_time"}</tool_call>', None, []),
    ("hermes", "<tool_call>" + "[" * 5000 + "</tool_call>", None, []),  # too deep for the decoder
    # llama3_json
    ("llama3_json", "It is sunny.", "It is sunny.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '\n<|python_tag|>{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", '
     '"parameters": {}};', None, [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ("llama3_json", "<|python_tag|>print('hi')", None, []),  # code, not a call
    ("llama3_json", '  {"name": "Bob", "parameters": {}}', None, []),  # JSON, but no such tool
    ("llama3_json", '{"name": "get_time", "parameters": {}} and more', None, []),
    ("llama3_json", '{"name": "get_time", "parameters": 3}', None, []),
    ("llama3_json", '{"name": "get_time", "parameters": {', None, []),  # cut off
    ("llama3_json", '<|python', None, []),
    ("llama3_json", "   ", "   ", []),
    # mistral
    ("mistral", "No tools needed.", "No tools needed.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]', None,
     [("get_weather", {"city": "Rome"})]),
    ("mistral", 'Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, '
     '{"name": "get_time", "arguments": {}, "id": "abc123def"}]', "Checking. ",
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ("mistral", "an array [1, 2] and [TOOL is not a marker", "an array [1, 2] and [TOOL is not a marker", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}]', None, []),
    ("mistral", "[TOOL_CALLS] []", None, []),
    ("mistral", '[TOOL_CALLS] {"name": "get_time", "arguments": {}}', None, []),  # not an array
    ("mistral", '[TOOL_CALLS] [{"name": "launch", "arguments": {}}]', None, []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": "{}"}]', None, []),
    # json_array
    ("json_array", '[{"name": "get_weather", "parameters": {"city": "Lima"}}]', None,
     [("get_weather", {"city": "Lima"})]),
    ("json_array", '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": '
     '{"city": "Lima", "unit": "f"}}]', None, [("get_time", {}), ("get_weather", {"city": "Lima", "unit": "f"})]),
    ("json_array", "[]", None, []),
    ("json_array", '[{"name": "get_time", "parameters": []}]', None, []),
    ("json_array", '[{"name": "nope", "parameters": {}}]', None, []),
    ("json_array", "Sure, here you go", "Sure, here you go", []),
]


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), CASES)
def test_parse(parser_name: str, text: str, content: str | None, calls: list[tuple[str, Any]]) -> None:
    out = get_parser(parser_name).parse(text, TOOLS)
    assert calls_of(out) == calls
    if calls:
        assert out.content == content
        assert len({c.id for c in out.tool_calls}) == len(calls)
        for call in out.tool_calls:
            assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
            assert call.arguments == json.dumps(json.loads(call.arguments), ensure_ascii=False)
    else:
        assert out.content == text  # all or nothing: no calls means the text, as it was


def test_arguments_keep_non_ascii_text() -> None:
    out = get_parser("hermes").parse(hermes_call("get_weather", {"city": "Zürich"}), TOOLS)
    assert out.tool_calls[0].arguments == '{"city": "Zürich"}'


def test_no_tools_means_no_calls() -> None:
    text = hermes_call("get_time", {})
    assert get_parser("hermes").parse(text, []) == ParsedOutput(text, [])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("parser_name", sorted(PARSERS))
@pytest.mark.parametrize("text", sorted({case[1] for case in CASES}))
def test_stream_agrees_with_parse(parser_name: str, text: str, size: int | None) -> None:
    """Every text (every format's, through every parser) streams to what parse() gives."""
    parser = get_parser(parser_name)
    whole = parser.parse(text, TOOLS)
    content, calls, _ = run_stream(parser, text, size)
    assert content == (whole.content or "")
    assert calls == [(c.name, c.arguments) for c in whole.tool_calls]


def test_stream_result_is_the_parse() -> None:
    stream = get_parser("hermes").stream(TOOLS)
    stream.feed("Hi " + hermes_call("get_time", {}))
    assert stream.result is None
    last = stream.finish()
    assert stream.result is not None and [c.name for c in stream.result.tool_calls] == ["get_time"]
    assert [(d.index, d.id, d.name, d.arguments) for d in last.tool_calls] == [
        (0, stream.result.tool_calls[0].id, "get_time", ""), (0, None, None, "{}")]
    assert stream.finish() == StreamDelta()
    with pytest.raises(RuntimeError):
        stream.feed("more")


def test_stream_sends_content_early() -> None:
    stream = get_parser("hermes").stream(TOOLS)
    assert stream.feed("Hello").content == "Hello"
    assert stream.feed(" <tool").content == " "  # '<tool' may start a call
    assert stream.feed("bar> x").content == "<toolbar> x"  # it did not
    assert stream.feed("<tool_call>").content == ""
    assert stream.feed('{"name": "get_time"}</tool_call>') == StreamDelta()  # calls wait for finish
    end = stream.finish()
    assert end.content == "" and [d.name for d in end.tool_calls] == ["get_time", None]


def test_stream_holds_leading_whitespace_only_until_text_follows() -> None:
    stream = get_parser("hermes").stream(TOOLS)
    assert stream.feed("\n\n").content == ""
    assert stream.feed("<tool_call>").content == ""
    stream.feed('{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert stream.finish().content == ""  # whitespace before a call is no content

    stream = get_parser("hermes").stream(TOOLS)
    assert stream.feed("\n\n").content == ""
    assert stream.feed("Hi").content == "\n\nHi"


def test_stream_mistral_and_llama3_content() -> None:
    stream = get_parser("mistral").stream(TOOLS)
    assert stream.feed("Sure [TOOL").content == "Sure "
    assert stream.feed("_CALLS] [").content == ""
    stream = get_parser("llama3_json").stream(TOOLS)
    assert stream.feed("  ").content == ""
    assert stream.feed("The answer").content == "  The answer"  # not JSON: plain content at once
    stream = get_parser("llama3_json").stream(TOOLS)
    assert stream.feed('{"name": "get_time", "parameters": {}}').content == ""  # may be a call
    assert [d.name for d in stream.finish().tool_calls] == ["get_time", None]


def test_stream_malformed_call_flushes_as_content() -> None:
    text = 'Hi <tool_call>{"name": "get_time", "arguments": {}'
    content, calls, pieces = run_stream(get_parser("hermes"), text, 3)
    assert content == text and calls == []
    assert pieces[-1].startswith("<tool_call>")  # held from the marker on, sent by finish()


def test_get_parser() -> None:
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral", "json_array"}
    for name in PARSERS:
        assert get_parser(name).name == name
    with pytest.raises(ValueError, match="hermes.*llama3_json|llama3_json.*hermes"):
        get_parser("pythonic")


def test_call_shapes() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    call = ToolCall("call_1", "f", "{}")
    with pytest.raises(AttributeError):
        call.name = "g"  # type: ignore[misc]


# ---- prompting ----

def test_tools_system_prompt_lists_each_tool() -> None:
    prompt = tools_system_prompt(TOOLS)
    listed = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].split("\n")
    assert [json.loads(line) for line in listed] == TOOLS
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt


def test_required_constraint() -> None:
    spec = required_constraint(TOOLS)
    assert spec.kind == "json" and spec.param == "tool_choice"
    schema = spec.json
    assert isinstance(schema, dict)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = [
        [{"name": "get_weather", "parameters": {"city": "Paris"}}],
        [{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "X", "unit": "f"}}],
        [{"name": "get_time", "parameters": {"anything": [1, 2]}}],
    ]
    bad = [
        [],
        {"name": "get_time", "parameters": {}},
        [{"name": "get_stock", "parameters": {}}],
        [{"name": "get_weather", "parameters": {}}],  # city is required
        [{"name": "get_weather", "parameters": {"city": "X", "unit": "k"}}],
        [{"name": "get_time"}],
        [{"name": "get_time", "parameters": {}, "extra": 1}],
        [{"name": "get_time", "parameters": "{}"}],
    ]
    for value in good:
        assert validator.is_valid(value), value
        # what the constraint admits, the json_array parser reads back
        out = get_parser("json_array").parse(json.dumps(value), TOOLS)
        assert calls_of(out) == [(v["name"], v["parameters"]) for v in value]
    for value in bad:
        assert not validator.is_valid(value), value
    with pytest.raises(ValueError, match="^tool_choice: "):
        required_constraint([])


def test_named_constraint() -> None:
    spec = named_constraint(TOOLS, "get_weather")
    assert spec.param == "tool_choice" and spec.json == WEATHER_PARAMS
    validator = jsonschema.Draft202012Validator(spec.json)
    assert validator.is_valid({"city": "Paris"}) and not validator.is_valid({"unit": "c"})
    assert named_constraint(TOOLS, "get_time").json == {"type": "object"}
    with pytest.raises(ValueError, match="^tool_choice: .*'get_stock'"):
        named_constraint(TOOLS, "get_stock")


def _tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": function}


def test_check_tools_accepts() -> None:
    for choice in (None, "none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}):
        check_tools(TOOLS, choice)
    check_tools(None, None)
    check_tools(None, "none")
    check_tools([_tool(name="a-B_9" + "x" * 59, description=None, parameters=None)], "auto")


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ("get_time", None, "tools: must be a list"),
    ([], None, "tools: must hold at least one"),
    (["get_time"], None, "tools: tools[0] must be an object"),
    ([{"function": {"name": "f"}}], None, "tools: tools[0].type must be 'function'"),
    ([{"type": "function"}], None, "tools: tools[0].function must be an object"),
    ([_tool(name="")], None, "tools: tools[0].function.name must be"),
    ([_tool(name="get weather")], None, "tools: tools[0].function.name must be"),
    ([_tool(name="x" * 65)], None, "tools: tools[0].function.name must be"),
    ([_tool(name="f\n")], None, "tools: tools[0].function.name must be"),
    ([_tool(name=3)], None, "tools: tools[0].function.name must be"),
    ([_tool(name="f"), _tool(name="f")], None, "tools: function 'f' is declared twice"),
    ([_tool(name="f", description=3)], None, "tools: tools[0].function.description"),
    ([_tool(name="f"), _tool(name="g", parameters="{}")], None, "tools: tools[1].function.parameters"),
    (TOOLS, "sometimes", "tool_choice: must be one of"),
    (TOOLS, 3, "tool_choice: must be"),
    (TOOLS, {"type": "function"}, "tool_choice: must be"),
    (TOOLS, {"type": "function", "function": {"name": 1}}, "tool_choice: must be"),
    (TOOLS, {"type": "tool", "function": {"name": "get_time"}}, "tool_choice: must be"),
    (TOOLS, {"type": "function", "function": {"name": "get_stock"}}, "tool_choice: names function 'get_stock'"),
    (None, "auto", "tool_choice: 'auto' needs tools"),
    (None, "required", "tool_choice: 'required' needs tools"),
    (None, {"type": "function", "function": {"name": "f"}}, "tool_choice: names function 'f' but no tools"),
])
def test_check_tools_rejects(tools: Any, choice: Any, message: str) -> None:
    with pytest.raises(ValueError) as e:
        check_tools(tools, choice)
    assert str(e.value).startswith(message)
