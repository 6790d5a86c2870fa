"""Benchmarks: `python -m atomr_trio bench serve` (load against any OpenAI-compatible server) and
`python -m atomr_trio bench offline` (LLM.generate throughput)."""
