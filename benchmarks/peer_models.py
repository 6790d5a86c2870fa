"""The default model in the formats the peers read: an HF directory (bf16 safetensors, for vLLM
and transformers) and a bf16 GGUF (for llama.cpp), both made from the same GGUF weights we serve.

    python benchmarks/peer_models.py [--out ../peer-models] [--llama-cpp-src DIR]

transformers keeps a GGUF checkpoint quantized and will not save it, so the weights come from our
own GGUF reader (dequantized, q/k un-permuted into HF layout); config and tokenizer come from
transformers' GGUF import. The bf16 GGUF is written by llama.cpp's convert_hf_to_gguf.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_hf_dir(out: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from atomr_trio.model_source import ModelSource, default_model_path

    if (out / "model.safetensors").exists():
        return out
    gguf = default_model_path()
    out.mkdir(parents=True, exist_ok=True)
    source = ModelSource.open(None)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    eos = list(source.eos_token_ids)
    GenerationConfig(eos_token_id=eos, bos_token_id=source.tokenizer.bos_token_id).save_pretrained(out)
    tensors = {}
    for name, arr, _ in source.weights():
        if name == "lm_head.weight" and source.config.tie_word_embeddings:
            continue
        tensors[name] = torch.as_tensor(arr).to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_bf16_gguf(hf_dir: Path, out: Path, llama_cpp_src: Path, python: str) -> Path:
    """`python`: an interpreter with torch, transformers and sentencepiece (the vLLM venv has them)."""
    if out.exists():
        return out
    script = llama_cpp_src / "convert_hf_to_gguf.py"
    env_path = str(llama_cpp_src / "gguf-py")
    subprocess.run([python, str(script), str(hf_dir), "--outtype", "bf16", "--outfile", str(out)],
                   check=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT.parent / "peer-models")
    p.add_argument("--llama-cpp-src", type=Path, help="llama.cpp source tree (for the bf16 GGUF)")
    p.add_argument("--convert-python", default=str(ROOT.parent / "venv-vllm" / "bin" / "python"),
                   help="interpreter for llama.cpp's converter (needs torch, transformers, sentencepiece)")
    args = p.parse_args()
    hf = write_hf_dir(args.out / "smollm2-135m-hf")
    print(hf)
    if args.llama_cpp_src:
        print(write_bf16_gguf(hf, args.out / "smollm2-135m-bf16.gguf", args.llama_cpp_src, args.convert_python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
