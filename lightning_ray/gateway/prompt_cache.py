"""Rendered prompts and their token ids, remembered: the same prompt is rendered and tokenized once.

The G rollouts of a GRPO group open with the same conversation (system rules, tool schemas, the question), and
an agent that retries a call sends it again; rendering and tokenizing a long prompt costs milliseconds. Both are
pure functions of their inputs (a template that reads the clock or draws random numbers is never cached), so a
hit gives exactly what a fresh render or tokenize would, whichever rollout did the work first. Nothing a rollout
generated is kept here: reusing a rollout's own sampled ids is the splice's job (`render.splice_prompt`), on
that rollout's history only.

Bounded: least recently used entries go first once the entries together exceed their size budget.
Not thread-safe: the gateway uses them from its event loop only.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from transformers import PreTrainedTokenizerBase

from lightning_ray.gateway.render import encode, render_chat

V = TypeVar("V")

DEFAULT_MAX_TOKENS = 1 << 20  # ids held by a TokenCache: tens of MiB at most
DEFAULT_MAX_CHARS = 1 << 24  # characters held by a RenderCache (keys and texts)
# Names a chat template would use to read the clock (transformers' `strftime_now`) or draw at random.
IMPURE_TEMPLATE_NAMES = ("strftime_now", "random")


class LRU(Generic[V]):
    """A map with a size budget: each entry has a size, the least recently used go when the sum exceeds it."""

    def __init__(self, budget: int):
        self.budget = budget
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        if size > self.budget or key in self._entries:
            return
        self._entries[key] = (value, size)
        self.size += size
        while self.size > self.budget:
            self.size -= self._entries.popitem(last=False)[1][1]

    def __len__(self) -> int:
        return len(self._entries)


class TokenCache:
    """Text -> token ids, as `render.encode` gives them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.tokenizer = tokenizer
        self.lru: LRU[tuple[int, ...]] = LRU(max_tokens)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        key = (text, add_special_tokens)
        ids = self.lru.get(key)
        if ids is None:
            fresh = encode(self.tokenizer, text, add_special_tokens=add_special_tokens)
            self.lru.put(key, tuple(fresh), len(fresh))
            return fresh
        return list(ids)


class RenderCache:
    """Chat template inputs -> the rendered prompt text, as `render.render_chat` gives it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_chars: int = DEFAULT_MAX_CHARS):
        self.tokenizer = tokenizer
        self.lru: LRU[str] = LRU(max_chars)

    def render(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if not self._pure(chat_template):
            return render_chat(self.tokenizer, messages, chat_template, tools, template_kwargs)
        # JSON keeps key order, types and values apart as the template sees them (inputs come from JSON).
        inputs = json.dumps([messages, tools, template_kwargs], ensure_ascii=False)
        key = (chat_template, inputs)
        text = self.lru.get(key)
        if text is None:
            text = render_chat(self.tokenizer, messages, chat_template, tools, template_kwargs)
            self.lru.put(key, text, len(inputs) + len(text))
        return text

    def _pure(self, chat_template: str | None) -> bool:
        source = chat_template if chat_template is not None else self.tokenizer.chat_template
        return not any(name in str(source) for name in IMPURE_TEMPLATE_NAMES)
