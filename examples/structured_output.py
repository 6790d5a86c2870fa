"""Extract typed records from text with the library: the output is constrained to a pydantic
model's JSON schema, so every answer parses into the model, and a forced tool call gives the
arguments of a declared function.

    python examples/structured_output.py
"""

import json
from typing import Literal

from pydantic import BaseModel, Field

from atomr_trio import LLM, SamplingParams
from atomr_trio.tools.prompting import required_constraint


class Event(BaseModel):
    name: str = Field(max_length=40)
    city: str = Field(max_length=30)
    kind: Literal["concert", "conference", "match", "festival"]


TEXTS = [
    "The Jazz Nights concert takes place in Montreal next Friday.",
    "PyCon, the Python conference, is held in Pittsburgh this year.",
    "Lyon hosts the final match of the rugby cup on Sunday.",
]
TOOLS = [{"type": "function", "function": {
    "name": "book_table", "description": "Book a table at a restaurant",
    "parameters": {"type": "object", "properties": {"people": {"type": "integer", "minimum": 1, "maximum": 20},
                                                    "time": {"type": "string", "pattern": "[0-2][0-9]:[0-5][0-9]"}},
                   "required": ["people", "time"], "additionalProperties": False}}}]

with LLM() as llm:
    params = SamplingParams(max_tokens=120, temperature=0, structured_outputs={"json": Event.model_json_schema()})
    conversations = [[{"role": "user", "content": f"Extract the event from: {t}"}] for t in TEXTS]
    for out in llm.chat(conversations, params, use_tqdm=False):
        event = Event.model_validate_json(out.outputs[0].text)
        print(f"event: {event!r}")

    ask = [{"role": "user", "content": "Book a table for four people at 19:30."}]
    forced = SamplingParams(max_tokens=80, temperature=0, structured_outputs=required_constraint(TOOLS, max_calls=1))
    out = llm.chat(ask, forced, tools=TOOLS, use_tqdm=False)[0]
    (call,) = json.loads(out.outputs[0].text)
    print(f"tool call: {call['name']}({call['parameters']})")
