"""Sampler: turns one step's logits into one token per sampling sequence, batched in torch.

Invariants:
- Every operation is over the whole [rows, vocab] tensor; Python loops run over rows only for
  per-request state that cannot be batched (a seeded generator, a sparse logit_bias).
- A seeded row draws its randomness from its own generator alone, so its tokens do not depend
  on what else is in the batch. Unseeded rows draw from the sampler's generator (one per
  engine, seeded from `EngineConfig.seed`); the process-wide torch RNG is never read or reseeded,
  so the user's own torch code and other engines in the process are not disturbed.
- Constrained rows (a grammar's matcher) have every token their grammar forbids masked in one
  batched op after penalties, bias and min_tokens; rows without one pay nothing.
- Returned logprobs are log-softmax of the model's raw logits (before penalties, temperature and
  truncation), as vLLM and OpenAI report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..grammar.matcher import Matcher, mask_logits
from ..sampling_params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int] | None  # only when penalties are used
    output_ids: list[int] | None  # only when penalties or min_tokens are used
    num_output_tokens: int
    matcher: Matcher | None = None  # the sample's grammar (structured outputs), read only here


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # the top-k alternatives, best first


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[TokenLogprobs]:
    """For each row of log-softmaxed `logprobs` [n, vocab]: its token's logprob and rank (1 + how
    many tokens score strictly higher) and the row's top ks[row] alternatives, in batched ops."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    k = max(ks, default=0)
    top_v, top_i = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    top_vl, top_il = top_v.tolist(), top_i.tolist()
    return [TokenLogprobs(t, c, r, list(zip(ti[:kk], tv[:kk], strict=True)))
            for t, c, r, ti, tv, kk in zip(tokens.tolist(), chosen.squeeze(1).tolist(), ranks, top_il, top_vl, ks,
                                           strict=True)]


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's index of its largest value (the first one on ties; NaN counts as largest, as
    in torch). On the CPU through NumPy, whose vectorized row argmax took 0.05 ms for [16, 49152]
    float32 where torch's took 0.65 ms (2-core Zen 4), the step's whole greedy sampling."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.argmax(dim=-1)
    return torch.from_numpy(np.argmax(x.contiguous().numpy(), axis=-1))


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], generator: torch.Generator | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)
        # For rows without a seed of their own; never torch's global generator.
        self.generator = generator if generator is not None else torch.Generator()

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        n, vocab = logits.shape
        dev = logits.device
        want_logprobs = [r.params.logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if any(r.params.uses_penalties for r in rows):
            logits = self._penalize(logits, rows)
        for i, r in enumerate(rows):
            if r.params.logit_bias:
                ids = torch.tensor(list(r.params.logit_bias), dtype=torch.long, device=dev)
                vals = torch.tensor(list(r.params.logit_bias.values()), dtype=logits.dtype, device=dev)
                logits[i].index_add_(0, ids, vals)
        blocked = [  # a grammar decides when a constrained row may stop
            i for i, r in enumerate(rows)
            if r.num_output_tokens < r.params.min_tokens and r.matcher is None
        ]
        for i in blocked:  # too early to stop: forbid EOS and the request's stop tokens
            stops = list(rows[i].params.stop_token_ids or [])
            if not rows[i].params.ignore_eos:
                stops += self.eos_token_ids
            if stops:
                logits[i, stops] = float("-inf")
        if any(r.matcher is not None for r in rows):
            mask_logits(logits, [r.matcher for r in rows])

        if all(r.params.greedy for r in rows):
            tokens = argmax_rows(logits)
        else:
            greedy = torch.tensor([r.params.greedy for r in rows], device=dev)
            temps = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows], device=dev)
            scaled = logits / temps.unsqueeze(1)
            scaled = self._truncate(scaled, rows)
            probs = torch.softmax(scaled, dim=-1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) is a sample from p.
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            for i, r in enumerate(rows):
                if r.generator is not None:  # a seeded row's own (CPU) generator: the same draws on every device
                    noise[i] = torch.empty(vocab, dtype=noise.dtype).exponential_(generator=r.generator).to(dev)
            sampled = argmax_rows(probs / noise)
            tokens = torch.where(greedy, argmax_rows(logits), sampled)

        token_list = tokens.tolist()  # the step's one device-to-host copy of sampled ids
        out: list[TokenLogprobs | None] = [None] * n
        if raw_logprobs is not None:
            idx = [i for i, w in enumerate(want_logprobs) if w]
            entries = token_logprobs(raw_logprobs[idx], tokens[idx], [rows[i].params.logprobs or 0 for i in idx])
            for i, entry in zip(idx, entries, strict=True):
                out[i] = entry
        return SamplerOutput(token_ids=token_list, logprobs=out)

    @staticmethod
    def _penalize(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        n, vocab = logits.shape
        logits = logits.clone()
        idx = [i for i, r in enumerate(rows) if r.params.uses_penalties]
        counts = torch.zeros(len(idx), vocab)
        seen = torch.zeros(len(idx), vocab, dtype=torch.bool)
        for j, i in enumerate(idx):  # built on the host, then moved in one copy each
            out_ids = torch.tensor(rows[i].output_ids or [], dtype=torch.long)
            counts[j].index_add_(0, out_ids, torch.ones(len(out_ids)))
            seen[j, torch.tensor(rows[i].prompt_ids or [], dtype=torch.long)] = True
        counts, seen = counts.to(logits.device), seen.to(logits.device)
        seen |= counts > 0
        sub = logits[idx]
        rep = torch.tensor([rows[i].params.repetition_penalty for i in idx], device=logits.device).unsqueeze(1)
        # Repetition penalty (CTRL): make every token seen so far less likely. A penalty too small
        # for float32 (it would round to 0) or a quotient past float32's range stays finite, and a
        # logit already at -inf (masked) stays there: an inf or NaN here would sample any token.
        big = torch.finfo(sub.dtype).max
        rep = rep.to(sub.dtype).clamp_min(torch.finfo(sub.dtype).tiny)
        penalized = torch.where(sub > 0, sub / rep, sub * rep).clamp(-big, big)
        sub = torch.where(seen & torch.isfinite(sub), penalized, sub)
        freq = torch.tensor([rows[i].params.frequency_penalty for i in idx], device=logits.device).unsqueeze(1)
        pres = torch.tensor([rows[i].params.presence_penalty for i in idx], device=logits.device).unsqueeze(1)
        sub = sub - freq * counts - pres * (counts > 0).float()
        logits[idx] = sub
        return logits

    @staticmethod
    def _truncate(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        vocab, dev = logits.shape[1], logits.device
        top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], device=dev)
        top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
        min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
        truncate = any(0 < r.params.top_k < vocab or r.params.top_p < 1.0 for r in rows)  # decided on the host
        if truncate:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            pos = torch.arange(vocab, device=dev).unsqueeze(0)
            drop = pos >= top_k.unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            probs = torch.softmax(sorted_logits, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            mass_before = probs.cumsum(dim=-1) - probs
            drop = mass_before >= top_p.unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        if any(r.params.min_p > 0 for r in rows):
            probs = torch.softmax(logits, dim=-1)
            floor = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            logits = logits.masked_fill(probs < floor, float("-inf"))
        return logits
