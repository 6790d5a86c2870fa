"""The engine inside your own Trio program: open it in your nursery, stream several requests at
once, then serve the OpenAI HTTP API from the same nursery for a moment.

    python examples/trio_app.py
"""

import httpx
import trio

from atomr_trio import SamplingParams, open_engine
from atomr_trio.runtime.deployment import DeploymentSpec
from atomr_trio.server.serve import ServerSettings, serve


async def stream_one(engine, prompt: str) -> None:
    text = ""
    async for delta in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=24), delta=True):
        text += delta.outputs[0].text
    print(f"{prompt!r} -> {text!r}")


async def main() -> None:
    # 1. The engine as a library: continuous batching across your tasks.
    async with open_engine(dtype="float32", max_model_len=1024) as engine:
        async with trio.open_nursery() as nursery:
            for prompt in ["The capital of France is", "Water boils at", "The largest planet is"]:
                nursery.start_soon(stream_one, engine, prompt)
        print("engine stats:", {k: engine.stats()[k] for k in ("steps", "multi_seq_steps", "generation_tokens")})

    # 2. The HTTP server as a task of your own nursery (port 0: any free port).
    async with trio.open_nursery() as nursery:
        settings = ServerSettings(deployments=[DeploymentSpec(name="smol", dtype="float32", max_model_len=1024)],
                                  port=0, handle_signals=False)
        binds = await nursery.start(serve, settings)
        async with httpx.AsyncClient(base_url=binds[0], timeout=60) as client:
            r = await client.post("/v1/completions", json={"model": "smol", "prompt": "Hello,", "max_tokens": 8})
            print("HTTP:", r.json()["choices"][0]["text"])
        nursery.cancel_scope.cancel()  # stops the server and its engines


if __name__ == "__main__":
    trio.run(main)
