"""Stream a chat from a running atomr_trio server with the official `openai` client.

    python -m atomr_trio &            # or: make serve
    python examples/openai_client.py  # ATOMR_BASE_URL / ATOMR_MODEL / OPENAI_API_KEY to override
"""

import os

from openai import OpenAI


def main() -> None:
    client = OpenAI(base_url=os.environ.get("ATOMR_BASE_URL", "http://127.0.0.1:8000/v1"),
                    api_key=os.environ.get("OPENAI_API_KEY", "not-needed"))
    model = os.environ.get("ATOMR_MODEL") or client.models.list().data[0].id
    print("model:", model)
    stream = client.chat.completions.create(
        model=model, temperature=0, max_tokens=48, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")


if __name__ == "__main__":
    main()
