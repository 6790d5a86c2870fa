"""RequestTracker: incremental text, stop strings and streaming hold-back, with a tiny tokenizer.

The tokenizer is byte-level BPE without merges: one token per UTF-8 byte, plus "</s>" as EOS.
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from atomr_trio.engine.messages import SeqDelta
from atomr_trio.executor.sampler import TokenLogprobs
from atomr_trio.outputs import RequestTracker
from atomr_trio.sampling_params import SamplingParams
from atomr_trio.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
    eos = hf.token_to_id("</s>")
    return Tokenizer(hf, bos_token_id=None, eos_token_ids=[eos], add_bos_token=False,
                     chat_template=None, source="test")


def make_tracker(tok: Tokenizer, params: SamplingParams, prompt: str = "Q: ") -> RequestTracker:
    return RequestTracker("req", prompt, tok.encode(prompt), params, tok, tok.eos_token_ids)


def stream(
    tr: RequestTracker, ids: list[int], finish: str | None = "length", index: int = 0, chunk: int = 1
) -> tuple[list[str], bool]:
    """Feed ids `chunk` at a time, reading a streaming delta after each; stop when a stop string hits."""
    pieces: list[str] = []
    for i in range(0, len(ids), chunk):
        last = i + chunk >= len(ids)
        stopped = tr.apply(SeqDelta(index, ids[i : i + chunk], None, finish if last else None))
        pieces.append(tr.delta_output().outputs[index].text)
        if stopped:
            return pieces, True
    return pieces, False


def check_stream_is_prefix_consistent(pieces: list[str], final: str) -> None:
    acc = ""
    for p in pieces:
        acc += p
        assert final.startswith(acc), f"streamed {acc!r}, which the final text {final!r} does not start with"
    assert acc == final


def test_plain_text_streams_everything(tok: Tokenizer) -> None:
    tr = make_tracker(tok, SamplingParams())
    pieces, stopped = stream(tr, tok.encode("Hello, wörld"))
    assert not stopped
    out = tr.output()
    assert out.finished and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == "Hello, wörld"
    assert out.outputs[0].token_ids == tok.encode("Hello, wörld")
    check_stream_is_prefix_consistent(pieces, "Hello, wörld")


def test_multibyte_character_is_never_split(tok: Tokenizer) -> None:
    tr = make_tracker(tok, SamplingParams())
    ids = tok.encode("é")
    assert len(ids) == 2
    assert not tr.apply(SeqDelta(0, ids[:1], None))
    assert tr.delta_output().outputs[0].text == ""
    assert tr.output().outputs[0].text == ""
    tr.apply(SeqDelta(0, ids[1:], None))
    assert tr.delta_output().outputs[0].text == "é"


def test_stop_string_cuts_text_exactly_before_it(tok: Tokenizer) -> None:
    tr = make_tracker(tok, SamplingParams(stop=["STOP"]))
    pieces, stopped = stream(tr, tok.encode("Hello STOP world"))
    assert stopped
    o = tr.output().outputs[0]
    assert (o.text, o.finish_reason, o.stop_reason) == ("Hello ", "stop", "STOP")
    assert tr.finished
    # Nothing of "STOP" was ever streamed, though "S", "ST", "STO" arrived one token at a time.
    check_stream_is_prefix_consistent(pieces, "Hello ")


def test_stop_string_included_when_asked(tok: Tokenizer) -> None:
    tr = make_tracker(tok, SamplingParams(stop=["STOP"], include_stop_str_in_output=True))
    pieces, stopped = stream(tr, tok.encode("Hello STOP world"))
    assert stopped
    assert tr.output().outputs[0].text == "Hello STOP"
    check_stream_is_prefix_consistent(pieces, "Hello STOP")


def test_text_that_could_begin_a_stop_string_is_held_back_then_released(tok: Tokenizer) -> None:
    tr = make_tracker(tok, SamplingParams(stop=["STOP"]))
    tr.apply(SeqDelta(0, tok.encode("abcST"), None))
    assert tr.delta_output().outputs[0].text == "ab"  # "cST" could still begin "STOP"
    tr.apply(SeqDelta(0, tok.encode("AR"), None))
    assert tr.delta_output().outputs[0].text == "cS"
    tr.apply(SeqDelta(0, tok.encode("!"), None, "length"))
    final = tr.delta_output().outputs[0]
    assert (final.text, final.finish_reason, final.stop_reason) == ("TAR!", "length", None)
    assert tr.output().outputs[0].text == "abcSTAR!"


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_string_spanning_deltas(tok: Tokenizer, chunk: int) -> None:
    tr = make_tracker(tok, SamplingParams(stop=["STOP"]))
    pieces, stopped = stream(tr, tok.encode("xxSTOPyy"), chunk=chunk)
    assert stopped
    assert tr.output().outputs[0].text == "xx"
    check_stream_is_prefix_consistent(pieces, "xx")


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    tr = make_tracker(tok, SamplingParams(stop=["world", "lo"]))
    tr.apply(SeqDelta(0, tok.encode("Hello world"), None))
    o = tr.output().outputs[0]
    assert (o.text, o.stop_reason) == ("Hel", "lo")


def test_stop_string_in_the_prompt_does_not_stop(tok: Tokenizer) -> None:
    tr = make_tracker(tok, SamplingParams(stop=["END"]), prompt="say END")
    pieces, stopped = stream(tr, tok.encode(" ok"))
    assert not stopped and tr.output().outputs[0].text == " ok"


def test_eos_ends_with_its_token_as_stop_reason(tok: Tokenizer) -> None:
    (eos,) = tok.eos_token_ids
    tr = make_tracker(tok, SamplingParams())
    pieces, _ = stream(tr, tok.encode("Hi") + [eos], finish="stop")
    o = tr.output().outputs[0]
    assert (o.text, o.finish_reason, o.stop_reason) == ("Hi", "stop", eos)
    assert o.token_ids[-1] == eos
    check_stream_is_prefix_consistent(pieces, "Hi")


def test_stop_token_id_is_the_stop_reason(tok: Tokenizer) -> None:
    bang = tok.encode("!")[0]
    tr = make_tracker(tok, SamplingParams(stop_token_ids=[bang]))
    stream(tr, tok.encode("wow!"), finish="stop")
    o = tr.output().outputs[0]
    assert (o.text, o.stop_reason) == ("wow!", bang)


def test_samples_finish_independently_and_late_deltas_are_ignored(tok: Tokenizer) -> None:
    tr = make_tracker(tok, SamplingParams(n=2, stop=["."]))
    assert tr.apply(SeqDelta(0, tok.encode("a."), None))
    assert not tr.finished
    assert not tr.apply(SeqDelta(0, tok.encode("zz"), None))  # sent before the abort landed
    assert tr.output().outputs[0].text == "a"
    tr.apply(SeqDelta(1, tok.encode("bc"), None, "length"))
    out = tr.output()
    assert out.finished
    assert [o.text for o in out.outputs] == ["a", "bc"]
    assert [o.finish_reason for o in out.outputs] == ["stop", "length"]


def test_logprobs_are_collected_per_token(tok: Tokenizer) -> None:
    a, b, c = tok.encode("abc")
    tr = make_tracker(tok, SamplingParams(logprobs=2))
    tr.apply(SeqDelta(0, [a], [TokenLogprobs(a, -0.5, 2, [(b, -0.25), (a, -0.5)])], num_cached_tokens=4))
    d1 = tr.delta_output().outputs[0]
    tr.apply(SeqDelta(0, [c], [TokenLogprobs(c, -1.0, 1, [(c, -1.0), (a, -2.0)])], "length"))
    d2 = tr.delta_output().outputs[0]
    assert d1.logprobs is not None and d2.logprobs is not None
    assert len(d1.logprobs) == 1 and len(d2.logprobs) == 1
    first = d1.logprobs[0]
    assert set(first) == {a, b}
    assert (first[a].logprob, first[a].rank, first[a].decoded_token) == (-0.5, 2, "a")
    assert (first[b].logprob, first[b].rank, first[b].decoded_token) == (-0.25, 1, "b")
    assert set(d2.logprobs[0]) == {c, a}
    out = tr.output()
    assert out.outputs[0].cumulative_logprob == pytest.approx(-1.5)
    assert out.num_cached_tokens == 4


def test_an_eos_the_tokenizer_does_not_know_is_still_the_stop_reason(tok: Tokenizer) -> None:
    # A model config may list EOS ids beyond the tokenizer's (ModelSource.eos_token_ids): the
    # tracker must judge the engine's "stop" by the same set the engine stopped on.
    bang = tok.encode("!")[0]
    tr = RequestTracker("req", "Q: ", tok.encode("Q: "), SamplingParams(), tok, (*tok.eos_token_ids, bang))
    stream(tr, tok.encode("wow!"), finish="stop")
    o = tr.output().outputs[0]
    assert (o.finish_reason, o.stop_reason) == ("stop", bang)


def test_spaces_between_special_tokens() -> None:
    """A tokenizer without a decoder joins every token with a space (as vLLM's default keeps);
    spaces_between_special_tokens=False writes nothing between two special tokens in a row."""
    hf = HFTokenizer(models.WordLevel({"hello": 0, "world": 1}, unk_token="hello"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok = Tokenizer(hf, bos_token_id=None, eos_token_ids=[], add_bos_token=False, chat_template=None, source="test")
    s, e = hf.token_to_id("<s>"), hf.token_to_id("</s>")
    ids = [0, s, e, s, 1]
    assert tok.decode(ids, skip_special_tokens=False) == "hello <s> </s> <s> world"
    assert tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False) == "hello <s></s><s> world"
    assert tok.decode(ids, spaces_between_special_tokens=False) == "hello world"  # skipped: nothing to join
    for spaces, want in ((True, " <s> </s> <s> world"), (False, " <s></s><s> world")):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces)
        tr = RequestTracker("req", None, [0], params, tok, tok.eos_token_ids)
        pieces, _ = stream(tr, ids[1:])
        assert "".join(pieces) == want == tr.output().outputs[0].text
