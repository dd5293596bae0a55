"""What the gateway remembers between calls gives exactly the ids of a fresh render + tokenize, stays bounded, and
never carries one rollout's generated ids into another's prompt. Real SmolLM2 tokenizer, vLLM's hermes parser."""

from __future__ import annotations

import pytest

from lightning_ray.gateway.calls import GatewayState, Generation, prepare_chat, record, reply_for
from lightning_ray.gateway.prompt_cache import RenderCache, TokenCache
from lightning_ray.gateway.protocol import ChatCompletionRequest
from lightning_ray.gateway.recorder import Recorder
from lightning_ray.gateway.render import decode, encode, load_tokenizer, render_chat
from lightning_ray.gateway.tools import load_parser_class, shipped_tools_template
from lightning_ray.models import builtin_tokenizer_dir
from tests.tools import CALC_TOOL

SYSTEM = {"role": "system", "content": "You are a careful calculator. Use the tool for every product."}
QUESTION = {"role": "user", "content": "What is 12 * 7?"}
TOOL_CALL_TEXT = (
    'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tok():
    load_parser_class("hermes")  # imports vLLM's parsers once for the module
    return load_tokenizer(builtin_tokenizer_dir())


def new_state(tok, cache: bool = True) -> GatewayState:
    """A gateway's state; without `cache`, every prompt is rendered and tokenized afresh (caches of size 0)."""
    state = GatewayState(
        tokenizer=tok, engine=None, recorder=Recorder(), served_model="tiny", max_model_len=4096
    )
    if not cache:
        state.render_cache = RenderCache(tok, max_chars=0)
        state.token_cache = TokenCache(tok, max_tokens=0)
    return state


def char_by_char(tok, text: str) -> list[int]:
    """Ids a model could sample for `text` that differ from its canonical tokenization."""
    return [i for ch in text for i in encode(tok, ch)]


def turn(state: GatewayState, rollout_id: str, messages: list[dict], generated: list[int]):
    """One chat call with tools, answered with `generated`; returns (prompt ids, the client's reply)."""
    req = ChatCompletionRequest.model_validate({"messages": messages, "tools": [CALC_TOOL]})
    call = prepare_chat(state, rollout_id, None, req)
    n = len(generated)
    gen = Generation(generated, [0.0] * n, [0] * n, finish_reason="stop", policy_version=0)
    return call.prompt.ids, reply_for(state, call, record(state, call, gen))


def conversation(state: GatewayState, rollout_id: str, tok, sampled_ids: bool) -> list[list[int]]:
    """Three turns: a tool call, the tool's result back, a follow-up question. Returns each turn's prompt ids
    and checks each against the rendered text."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    spell = (lambda text: char_by_char(tok, text)) if sampled_ids else (lambda text: encode(tok, text))
    state.recorder.open(rollout_id)
    messages = [SYSTEM, QUESTION]
    ids1, reply = turn(state, rollout_id, messages, [*spell(TOOL_CALL_TEXT), end])
    call_id = reply.tool_calls[0]["id"]
    messages += [
        {"role": "assistant", "content": reply.content, "tool_calls": reply.tool_calls},
        {"role": "tool", "tool_call_id": call_id, "content": "84"},
    ]
    ids2, _ = turn(state, rollout_id, messages, [*spell("12 * 7 = 84."), end])
    messages += [{"role": "assistant", "content": "12 * 7 = 84."}, {"role": "user", "content": "And 13 * 7?"}]
    ids3, _ = turn(state, rollout_id, messages, [*spell("91"), end])
    transitions = state.recorder.close(rollout_id)
    assert [t.prompt_ids for t in transitions] == [ids1, ids2, ids3]
    assert [t.extra["spliced_from"] for t in transitions] == [None, 0, 1]
    first_text = render_chat(
        tok, [SYSTEM, QUESTION], chat_template=shipped_tools_template(), tools=[CALC_TOOL]
    )
    assert ids1 == encode(tok, first_text)  # exactly a fresh render + tokenize
    for ids in (ids1, ids2, ids3):
        assert ids[: len(ids1)] == ids1
        assert decode(tok, ids, skip_special_tokens=False).startswith(first_text)
    assert ids2[: len(ids1) + len(transitions[0].response_ids)] == [*ids1, *transitions[0].response_ids]
    assert ids3[: len(ids2) + len(transitions[1].response_ids)] == [*ids2, *transitions[1].response_ids]
    return [ids1, ids2, ids3]


@pytest.mark.parametrize("sampled_ids", [False, True], ids=["canonical", "sampled-char-by-char"])
def test_cached_multi_turn_ids_equal_fresh_ones(tok, sampled_ids):
    fresh = conversation(new_state(tok, cache=False), "fresh", tok, sampled_ids)

    state = new_state(tok)
    runs = [conversation(state, f"rollout-{i}", tok, sampled_ids) for i in range(3)]

    assert all(run == fresh for run in runs)
    # the later rollouts' first prompts came from the caches (later turns are new text, spliced)
    assert state.render_cache.lru.hits >= 2 and state.token_cache.lru.hits >= 2


def test_rollouts_never_splice_each_others_answers(tok):
    """Two rollouts end a call in the same text with different ids, then send the same follow-up: each prompt
    continues its own rollout's ids, and a third rollout that never made the first call gets fresh ids."""
    state = new_state(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = {"a": [*char_by_char(tok, "Eighty-four."), end], "b": [*encode(tok, "Eighty-four."), end]}
    assert answers["a"] != answers["b"]
    follow_up = [
        SYSTEM,
        QUESTION,
        {"role": "assistant", "content": "Eighty-four."},
        {"role": "user", "content": "Thanks"},
    ]
    prompts = {}
    for rollout_id, answer in answers.items():
        state.recorder.open(rollout_id)
        first, _ = turn(state, rollout_id, [SYSTEM, QUESTION], answer)
        prompts[rollout_id], _ = turn(state, rollout_id, follow_up, answer)
        assert prompts[rollout_id][: len(first) + len(answer)] == [*first, *answer]
    state.recorder.open("c")
    fresh, _ = turn(state, "c", follow_up, answers["b"])

    text = render_chat(tok, follow_up, chat_template=shipped_tools_template(), tools=[CALC_TOOL])
    assert fresh == encode(tok, text)
    assert prompts["a"] != prompts["b"]
    assert fresh != prompts["a"]


def test_token_cache_is_exact_and_returns_copies(tok):
    cache = TokenCache(tok)
    text = render_chat(tok, [SYSTEM, QUESTION], chat_template=shipped_tools_template(), tools=[CALC_TOOL])
    first = cache.encode(text)
    first.append(-1)  # the caller owns what it gets
    assert cache.encode(text) == encode(tok, text)
    special = cache.encode("12 * 7 =", add_special_tokens=True)
    assert special == encode(tok, "12 * 7 =", add_special_tokens=True)
    assert (cache.lru.hits, cache.lru.misses) == (1, 2)


def test_render_cache_tells_apart_what_the_template_sees(tok):
    """Inputs that differ only in key order, a value's type or the tools render (and are cached) apart."""
    cache = RenderCache(tok)
    template = shipped_tools_template()
    variants = [
        ([SYSTEM, QUESTION], None),
        ([SYSTEM, QUESTION], [CALC_TOOL]),
        ([SYSTEM, {"content": QUESTION["content"], "role": "user"}], [CALC_TOOL]),
        ([SYSTEM, QUESTION, {"role": "assistant", "content": "84"}, QUESTION], [CALC_TOOL]),
        ([SYSTEM, {"role": "tool", "tool_call_id": "1", "content": "84"}], [CALC_TOOL]),
        ([SYSTEM, {"role": "tool", "tool_call_id": 1, "content": "84"}], [CALC_TOOL]),
    ]
    for _ in range(2):
        for messages, tools in variants:
            expected = render_chat(tok, messages, chat_template=template, tools=tools)
            assert cache.render(messages, chat_template=template, tools=tools) == expected
    assert (cache.lru.hits, cache.lru.misses, len(cache.lru)) == (6, 6, 6)


def test_templates_that_read_the_clock_are_never_cached(tok):
    cache = RenderCache(tok)
    template = "{{ strftime_now('%H:%M:%S.%f') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    first = cache.render([QUESTION], chat_template=template)
    assert cache.render([QUESTION], chat_template=template) != first
    assert len(cache.lru) == 0


def test_caches_are_bounded_and_evict_the_least_recently_used(tok):
    texts = [f"Question {i}: what is {i} * 7?" for i in range(4)]
    sizes = [len(encode(tok, t)) for t in texts]
    cache = TokenCache(tok, max_tokens=sizes[0] + sizes[1] + sizes[2])
    for t in texts[:3]:
        cache.encode(t)
    cache.encode(texts[0])  # now the most recently used
    cache.encode(texts[3])  # evicts texts[1], the least recently used
    assert cache.lru.size == sizes[0] + sizes[2] + sizes[3] <= cache.lru.budget
    misses = cache.lru.misses
    for t in (texts[0], texts[3], texts[1]):
        assert cache.encode(t) == encode(tok, t)
    assert cache.lru.misses == misses + 1  # only texts[1] was tokenized again

    small = TokenCache(tok, max_tokens=3)
    assert small.encode(texts[0]) == encode(tok, texts[0])  # too long to keep, still tokenized
    assert (len(small.lru), small.lru.size) == (0, 0)

    renders = RenderCache(tok, max_chars=2000)
    for i in range(50):
        renders.render([{"role": "user", "content": f"question {i}"}])
        assert renders.lru.size <= 2000
    assert 0 < len(renders.lru) < 50


def test_repeated_calls_leave_one_entry_to_splice_on(tok):
    """An agent that sends the same prompt and gets the same answer many times keeps the splice history (and
    each later call's scan of it) at one entry; the earliest call stays the one spliced from."""
    state = new_state(tok)
    state.recorder.open("r")
    answer = [*encode(tok, "84"), tok.convert_tokens_to_ids("<|im_end|>")]
    prompts = [turn(state, "r", [QUESTION], answer)[0] for _ in range(50)]
    assert all(p == prompts[0] for p in prompts)
    assert [p.call_index for p in state.recorder.history("r")] == [0]
    follow_up = [QUESTION, {"role": "assistant", "content": "84"}, {"role": "user", "content": "Sure?"}]
    turn(state, "r", follow_up, answer)
    assert state.recorder.transitions("r")[-1].extra["spliced_from"] == 0
