"""Chat rendering, splicing of earlier turns and incremental decoding, on the real SmolLM2 tokenizer."""

from __future__ import annotations

import random

import pytest

from lightning_ray.gateway.render import (
    REPLACEMENT_CHAR,
    IncrementalDecoder,
    PriorCall,
    decode,
    encode,
    load_chat_template,
    load_tokenizer,
    render_chat,
    splice_prompt,
)
from lightning_ray.models import builtin_tokenizer_dir

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is 2 + 2?"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(builtin_tokenizer_dir())


def prior_call(tok, index: int, messages: list[dict], response_ids: list[int]) -> PriorCall:
    text = render_chat(tok, messages)
    return PriorCall(
        call_index=index,
        prompt_text=text,
        prompt_ids=tuple(encode(tok, text)),
        response_ids=tuple(response_ids),
        raw_response_text=decode(tok, response_ids, skip_special_tokens=False),
    )


def char_by_char(tok, text: str) -> list[int]:
    """Ids a model could sample for `text` that differ from its canonical tokenization (one token per char)."""
    return [i for ch in text for i in encode(tok, ch)]


def test_render_adds_generation_prompt_and_round_trips(tok):
    text = render_chat(tok, CONVERSATION)
    assert text.endswith("<|im_start|>assistant\n")
    assert text == tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = encode(tok, text)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert decode(tok, ids, skip_special_tokens=False) == text


def test_custom_chat_template_file(tok, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    text = render_chat(tok, CONVERSATION, chat_template=load_chat_template(path))
    assert text == "[system] You answer in one word.\n[user] What is 2 + 2?\n[assistant] "
    assert load_chat_template(None) is None


def test_answer_sent_back_is_spliced_with_the_sampled_ids(tok):
    answer = "Four, of course."
    sampled = [*char_by_char(tok, answer), tok.eos_token_id]  # not how the tokenizer would split it
    first = prior_call(tok, 0, CONVERSATION, sampled)
    follow_up = [
        *CONVERSATION,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    text = render_chat(tok, follow_up)

    prompt = splice_prompt(tok, text, [first])

    assert prompt.spliced_from == 0
    head = [*first.prompt_ids, *sampled]
    assert prompt.ids[: len(head)] == head
    assert decode(tok, prompt.ids, skip_special_tokens=False) == text
    assert prompt.ids != encode(tok, text)  # re-tokenizing would have changed the model's own ids


def test_truncated_answer_without_eos_is_spliced(tok):
    sampled = encode(tok, "Four and a")  # finish_reason "length": no end-of-turn token
    first = prior_call(tok, 0, CONVERSATION, sampled)
    follow_up = [
        *CONVERSATION,
        {"role": "assistant", "content": "Four and a"},
        {"role": "user", "content": "Go on"},
    ]
    prompt = splice_prompt(tok, render_chat(tok, follow_up), [first])
    assert prompt.spliced_from == 0
    assert prompt.ids[: len(first.prompt_ids) + len(sampled)] == [*first.prompt_ids, *sampled]


def test_rewritten_history_is_tokenized_fresh(tok):
    sampled = [*char_by_char(tok, "Four"), tok.eos_token_id]
    first = prior_call(tok, 0, CONVERSATION, sampled)
    rewritten = [
        {"role": "system", "content": "Summary so far: the user asked about 2 + 2."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    text = render_chat(tok, rewritten)
    prompt = splice_prompt(tok, text, [first])
    assert prompt.spliced_from is None
    assert prompt.ids == encode(tok, text)

    edited = [*CONVERSATION, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"}]
    prompt = splice_prompt(tok, render_chat(tok, edited), [first])  # the client changed the answer
    assert prompt.spliced_from is None


def test_longest_matching_call_wins(tok):
    a1 = [*char_by_char(tok, "Four"), tok.eos_token_id]
    turn1 = prior_call(tok, 0, CONVERSATION, a1)
    second = [
        *CONVERSATION,
        {"role": "assistant", "content": "Four"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    second_text = render_chat(tok, second)
    second_prompt = splice_prompt(tok, second_text, [turn1])
    a2 = [*char_by_char(tok, "Six"), tok.eos_token_id]
    turn2 = PriorCall(
        1, second_text, tuple(second_prompt.ids), tuple(a2), decode(tok, a2, skip_special_tokens=False)
    )
    third = [*second, {"role": "assistant", "content": "Six"}, {"role": "user", "content": "Thanks"}]
    prompt = splice_prompt(tok, render_chat(tok, third), [turn1, turn2])
    assert prompt.spliced_from == 1
    assert prompt.ids[: len(second_prompt.ids) + len(a2)] == [*second_prompt.ids, *a2]
    assert prompt.ids[: len(turn1.prompt_ids) + len(a1)] == [*turn1.prompt_ids, *a1]  # the whole chain holds


def test_special_token_inside_an_answer_blocks_the_splice(tok):
    """The client never sees a special token the model emitted mid-answer, so its history cannot extend it."""
    sampled = [
        *encode(tok, "Fo"),
        tok.convert_tokens_to_ids("<|im_start|>"),
        *encode(tok, "ur"),
        tok.eos_token_id,
    ]
    first = prior_call(tok, 0, CONVERSATION, sampled)
    client_text = decode(tok, sampled)
    assert client_text == "Four"
    follow_up = [
        *CONVERSATION,
        {"role": "assistant", "content": client_text},
        {"role": "user", "content": "Ok"},
    ]
    assert splice_prompt(tok, render_chat(tok, follow_up), [first]).spliced_from is None


def stream_text(tok, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push([i]) for i in ids]
    deltas.append(decoder.finish())
    assert decoder.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize(
    "text",
    ["Hello world, it's 2 + 2 = 4.", "数学很有趣 😀 — naïve café", "Zeilen\n\nmit  Leerzeichen\t\tund Tabs"],
)
def test_stream_deltas_concatenate_to_the_decoded_text(tok, text):
    ids = encode(tok, text)
    deltas = stream_text(tok, ids)
    assert "".join(deltas) == decode(tok, ids) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)  # partial characters are held back, never streamed


def test_stream_skips_special_tokens_like_the_whole_decode(tok):
    ids = [*encode(tok, "Four"), tok.eos_token_id]
    assert "".join(stream_text(tok, ids)) == decode(tok, ids) == "Four"


def test_stream_of_invalid_utf8_ends_exactly_like_the_whole_decode(tok):
    emoji = encode(tok, "😀")
    assert len(emoji) > 1  # byte-level pieces of one character
    ids = [*encode(tok, "cut:"), *emoji[:-1]]  # generation stopped mid-character (finish_reason "length")
    deltas = stream_text(tok, ids)
    assert "".join(deltas) == decode(tok, ids)
    assert deltas[-1].endswith(REPLACEMENT_CHAR)


def test_stream_with_multi_token_deltas(tok):
    ids = encode(tok, "数学很有趣 😀 and more text after it")
    decoder = IncrementalDecoder(tok)
    out = [decoder.push(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    out.append(decoder.finish())
    assert "".join(out) == decode(tok, ids)


def test_decode_equals_the_tokenizers_own_decode(tok):
    """`decode` may take a shorter path to the backend; it must give exactly what `tokenizer.decode` gives."""
    rng = random.Random(0)
    specials = [tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    samples = [
        encode(tok, render_chat(tok, CONVERSATION)),
        [*char_by_char(tok, "héllo wörld 😀 "), *specials],
        encode(tok, "😀")[:1],  # an incomplete UTF-8 character
        [],
        *([rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))] for _ in range(50)),
    ]
    for ids in samples:
        for skip in (True, False):
            expected = tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert decode(tok, ids, skip_special_tokens=skip) == expected
            assert decode(tok, tuple(ids), skip_special_tokens=skip) == expected
