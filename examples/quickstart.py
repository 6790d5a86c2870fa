"""Generate and chat with the default model (SmolLM2-135M-Instruct), from a plain script.

    python examples/quickstart.py
"""

from atomr_trio import LLM, SamplingParams


def main() -> None:
    with LLM(dtype="float32", max_model_len=2048) as llm:
        print(llm)
        greedy = SamplingParams(temperature=0, max_tokens=32)
        for out in llm.generate(["The capital of France is", "def fibonacci(n):"], greedy):
            print(f"{out.prompt!r} -> {out.outputs[0].text!r}")

        question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        answer = llm.chat(question, greedy)[0].outputs[0]
        print("chat:", answer.text, f"({answer.finish_reason})")

        creative = SamplingParams(n=2, temperature=0.8, top_p=0.95, seed=7, max_tokens=24)
        for sample in llm.generate("Write a one-line poem about the sea:", creative)[0].outputs:
            print(f"sample {sample.index}: {sample.text!r}")


if __name__ == "__main__":
    main()
