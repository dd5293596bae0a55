"""Text <-> token ids for the gateway: chat template, splice of earlier turns, incremental decode.

Three rules keep the recorded ids exact:

- A chat request is rendered to text once (`add_generation_prompt=True`) and tokenized once; the ids go to
  the engine as they are.
- When a request extends an earlier call of the same rollout (that call's prompt text followed by its raw
  generated text, special tokens included, is a prefix of the new text), the new prompt reuses the earlier
  prompt ids and the ids the model generated, and only the rest of the text is tokenized. Re-tokenizing the
  model's own answer could give different ids than the ones it sampled (drift); splicing cannot.
- The text a client receives is `decode(response_ids, skip_special_tokens=True)`; streamed deltas are cut from
  successive full decodes, so they concatenate to exactly that string.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

if TYPE_CHECKING:
    from lightning_ray.gateway.prompt_cache import TokenCache

REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def load_chat_template(path: str | Path | None) -> str | None:
    """The text of a Jinja chat template file (config `model.chat_template`), or None for the tokenizer's own."""
    return None if path is None else Path(path).read_text()


def encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = False) -> list[int]:
    """Tokenize text. Rendered chat text already holds its special tokens, so none are added by default."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Decode without any space clean-up, so that decoding is a pure function of the ids."""
    if _plain_fast_decode(type(tokenizer)):
        # What `tokenizer.decode` ends in for these classes, without its per-id type conversion of the list
        # (a large share of decoding a short answer, and the gateway decodes every answer and stream step).
        return tokenizer.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return tokenizer.decode(
        list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


@functools.cache
def _plain_fast_decode(cls: type) -> bool:
    """Whether `cls` decodes exactly as `TokenizersBackend` does (no class of its own changes decoding)."""
    return (
        issubclass(cls, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
    )


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """Render a conversation to the prompt text, ending with the assistant's generation prompt.

    `tools` are handed to the template as they are (templates that know tools render them); parsing tool calls
    out of the model's answer is a separate step.
    """
    text = tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=False,
        **(template_kwargs or {}),
    )
    if not isinstance(text, str):
        raise TypeError(f"chat template rendered {type(text).__name__}, expected text")
    return text


@dataclass(frozen=True)
class PriorCall:
    """What a finished call leaves for splicing: its prompt (text and ids) and the ids it generated."""

    call_index: int
    prompt_text: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    raw_response_text: str  # decode(response_ids) with special tokens kept
    full_text: str = field(init=False, repr=False)  # prompt + raw answer, joined once for all later calls

    def __post_init__(self) -> None:
        object.__setattr__(self, "full_text", self.prompt_text + self.raw_response_text)


@dataclass(frozen=True)
class Prompt:
    """Prompt ids for the engine; `spliced_from` is the call whose ids were reused, if any."""

    text: str | None
    ids: list[int]
    spliced_from: int | None = None


def splice_prompt(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    history: Iterable[PriorCall],
    add_special_tokens: bool = False,
    cache: TokenCache | None = None,
) -> Prompt:
    """Ids for `text`, reusing the ids of the longest earlier call whose prompt + raw answer prefixes it.

    The splice is kept only if the spliced ids decode back to `text` (with special tokens); a tokenizer that
    adds a prefix space to a segment tokenized on its own would break that, and then the text is tokenized
    whole, as a fresh prompt (through `cache` when given: the same ids, remembered).
    """
    best: PriorCall | None = None
    for prior in history:
        full = prior.full_text
        if text.startswith(full) and (best is None or len(full) > len(best.full_text)):
            best = prior
    if best is not None:
        suffix = text[len(best.full_text) :]
        ids = [*best.prompt_ids, *best.response_ids, *encode(tokenizer, suffix)]
        if decode(tokenizer, ids, skip_special_tokens=False) == text:
            return Prompt(text=text, ids=ids, spliced_from=best.call_index)
    if cache is not None:
        return Prompt(text=text, ids=cache.encode(text, add_special_tokens=add_special_tokens))
    return Prompt(text=text, ids=encode(tokenizer, text, add_special_tokens=add_special_tokens))


class IncrementalDecoder:
    """Streams text for growing response ids; the deltas concatenate to exactly `decode(all ids)`.

    Each step decodes all ids so far (a pure function of the ids, so every step's text extends the emitted
    text) and holds back trailing replacement characters: they may be the first bytes of a character whose
    remaining bytes come with the next token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, new_ids: Sequence[int]) -> str:
        """Add ids; return the text that became final."""
        self.ids.extend(new_ids)
        text = decode(self.tokenizer, self.ids).rstrip(REPLACEMENT_CHAR)
        return self._advance(text)

    def finish(self) -> str:
        """Return whatever is left, held-back replacement characters included."""
        return self._advance(decode(self.tokenizer, self.ids))

    @property
    def text(self) -> str:
        return self.emitted

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):
            raise RuntimeError("decoded text does not extend the text already streamed")
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta
