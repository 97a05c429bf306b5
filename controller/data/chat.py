"""How the turns of a multi-turn row become tokens: a chat template, or plain concatenation.

A row's tokens are the prompt, then each model turn (what the sampler drew) and each
observation (what the environment or the tools said), in order. `ChatFormat` turns messages
into the observation's tokens so that, put together, the row's tokens are the chat template's
rendering of the whole conversation:

- `HFChatFormat` (a Hugging Face tokenizer with a chat template): the prompt is the template
  with the generation prompt and the tools (`tools=[...]`, as Qwen 2.5 / 3 templates take
  them). After a model turn, the observation is what the template writes after the text so
  far when the conversation gains the new messages and a new generation prompt: the end of
  the assistant turn the model did not write itself (e.g. the newline after `<|im_end|>`),
  the new messages and `<|im_start|>assistant\\n`. The assistant message is the model's text
  as drawn (tool calls included), so the template renders it back unchanged. Where the text so
  far is not a prefix of the new rendering (a template that rewrites earlier turns, or a
  model turn whose bytes do not decode), the observation is the template's difference between
  the conversation with and without the new messages, after the rest of the assistant turn's
  closing text (counted in `env/template_fallbacks`).
- `PlainChatFormat` (the built-in character and byte tokenizers, which have no template): the
  messages' contents are concatenated, so a `reverse_digits_check` row reads
  `3721=1243.12-3=1273.`. Tools are not described to the model (the environment's own
  messages may); characters a character tokenizer lacks are dropped from observations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.data.hf_tokenizer import HFTokenizer
from controller.data.tokenizer import CharTokenizer, Tokenizer


@dataclass
class ChatState:
    """One row's conversation so far: its messages and (HF) the text its tokens spell."""

    messages: list[dict[str, Any]]
    text: str = ""
    stop_text: str = ""  # the text of the stop token that ended the last model turn, if any
    fallbacks: int = 0  # observations rendered by the template's difference (see above)


class ChatFormat(Protocol):
    def start(self, messages: list[dict[str, Any]]) -> tuple[list[int], ChatState]:
        """The prompt's ids (with the generation prompt) and the row's state."""
        ...

    def add_turn(self, state: ChatState, ids: Sequence[int]) -> str:
        """Records a model turn (its ids as drawn, stop token included); returns its text,
        what the environment and the tool-call parser read."""
        ...

    def observe(self, state: ChatState, messages: list[dict[str, Any]]) -> list[int] | None:
        """The ids that follow the model's turn: the new messages and the next generation
        prompt. None when the template cannot render them (the row then ends)."""
        ...


def build_chat_format(tokenizer: Tokenizer, tools: list[dict[str, Any]] | None = None
                      ) -> ChatFormat:
    """The chat template of a Hugging Face tokenizer that has one, else plain concatenation."""
    if isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is not None:
        return HFChatFormat(tokenizer, tools)
    return PlainChatFormat(tokenizer)


class PlainChatFormat:
    """Messages' contents, concatenated; for tokenizers without a chat template."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def start(self, messages: list[dict[str, Any]]) -> tuple[list[int], ChatState]:
        text = "".join(str(m.get("content", "")) for m in messages)
        return self.tokenizer.encode(self._known(text)), ChatState([dict(m) for m in messages])

    def add_turn(self, state: ChatState, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(ids)
        state.messages.append({"role": "assistant", "content": text})
        return text

    def observe(self, state: ChatState, messages: list[dict[str, Any]]) -> list[int] | None:
        state.messages.extend(dict(m) for m in messages)
        text = "".join(str(m.get("content", "")) for m in messages)
        return self.tokenizer.encode(self._known(text), bos=False)

    def _known(self, text: str) -> str:
        """A character tokenizer's text without the characters it has no id for."""
        if isinstance(self.tokenizer, CharTokenizer):
            alphabet = self.tokenizer.alphabet
            return "".join(c for c in text if c in alphabet)
        return text


@dataclass
class HFChatFormat:
    """A Hugging Face chat template over the whole conversation (see the module docstring)."""

    tokenizer: HFTokenizer
    tools: list[dict[str, Any]] | None = None
    _kwargs: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.tools:
            self._kwargs = {"tools": self.tools}

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, **self._kwargs)

    def start(self, messages: list[dict[str, Any]]) -> tuple[list[int], ChatState]:
        state = ChatState([dict(m) for m in messages])
        state.text = self.render(state.messages, True)
        return self.tokenizer.encode(state.text, bos=False), state

    def add_turn(self, state: ChatState, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        raw = self.tokenizer.decode_all(ids)
        # The assistant message holds the model's text without its end-of-turn token, which
        # the template writes itself.
        stopped = bool(ids) and ids[-1] in self.tokenizer.stop_ids
        content = self.tokenizer.decode_all(ids[:-1]) if stopped else raw
        state.stop_text = raw[len(content):] if stopped and raw.startswith(content) else ""
        state.text += raw
        state.messages.append({"role": "assistant", "content": content})
        return content

    def observe(self, state: ChatState, messages: list[dict[str, Any]]) -> list[int] | None:
        before = list(state.messages)
        state.messages.extend(dict(m) for m in messages)
        try:
            full = self.render(state.messages, True)
        except Exception:  # e.g. a template that refuses the "tool" role
            return None
        if full.startswith(state.text):
            obs = full[len(state.text):]
        else:
            # The template's difference, after the rest of the assistant turn's closing text.
            try:
                without = self.render(before, False)
            except Exception:
                return None
            if not full.startswith(without):
                return None
            content = str(before[-1].get("content", "")) if before else ""
            at = without.rfind(content) if content else -1
            closer = without[at + len(content):] if at >= 0 else ""
            closer = closer.removeprefix(state.stop_text) if state.stop_text else closer
            obs = closer + full[len(without):]
            state.fallbacks += 1
        state.text = full
        return self.tokenizer.encode(obs, bos=False)
