"""atomr_trio: an LLM inference engine and OpenAI-compatible server built as Trio actors.

Library use: `LLM` (sync, scripts and notebooks) and `open_engine` / `AsyncLLM` (Trio code).
"""

from .async_llm import AsyncLLM, open_engine
from .engine.engine_config import EngineConfig
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestError, RequestOutput
from .sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineConfig",
    "Logprob",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "open_engine",
]
__version__ = "0.1.0"
