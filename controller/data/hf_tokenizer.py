"""A Hugging Face tokenizer from a local directory, with `CharTokenizer`'s interface.

Built on the `tokenizers` library from `tokenizer.json` (no `transformers` at run time, no
network). Special tokens come from `tokenizer_config.json`; the chat template from
`chat_template.jinja` or `tokenizer_config.json`, rendered with Jinja2 in a sandbox as
`transformers` renders it; extra stop ids from `generation_config.json` (e.g. Llama 3 instruct
stops on both <|eot_id|> and <|end_of_text|>).

Conventions (what `transformers` does):
- `encode(text, bos=True)` adds no special tokens except a leading BOS when the tokenizer has
  one (Llama, Gemma; Qwen has none).
- `encode_chat(messages)` renders the chat template (which writes its own BOS) and encodes the
  text without adding another.
- `decode(ids)` stops after the first stop id and drops special tokens.
- `pad_id` is the pad token, or the EOS token when there is none (Llama 3); padding is always
  masked, so its value only has to be a valid id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any


class TokenizerFilesError(FileNotFoundError):
    """The tokenizer files of a model directory are missing or unreadable."""


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerFilesError(f"{file} is not valid JSON: {e}") from None


class HFTokenizer:
    """encode / decode / pad_id / stop_id / vocab_size over a HF `tokenizer.json`."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerFilesError(
                f"{file} does not exist (fix: model.path must hold the model's tokenizer.json; "
                f"a slow-only tokenizer can be converted with transformers: "
                f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
        self._tok = Tokenizer.from_file(str(file))
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        self.unk_token = _token_text(cfg.get("unk_token"))
        self.bos_id = self._id(self.bos_token, "bos_token")
        eos_id = self._id(self.eos_token, "eos_token")
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        stops = ([eos_id] if eos_id is not None else []) + gen_eos
        if not stops:
            raise TokenizerFilesError(
                f"{path}: no eos_token in tokenizer_config.json and no eos_token_id in "
                f"generation_config.json, so generation could never stop (fix: set eos_token)")
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in stops))
        self.stop_id = self.stop_ids[0]
        pad_id = self._id(self.pad_token, "pad_token")
        self.pad_id = pad_id if pad_id is not None else self.stop_id
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else cfg.get(
            "chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        self.chat_template: str | None = template
        self._compiled: Any = None

    def _id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerFilesError(f"{self.path / 'tokenizer_config.json'}: {field}="
                                      f"{token!r} is not in tokenizer.json's vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        """Ids in use (with added tokens); the model's embedding may be larger (padding)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids up to and including the first stop id; special tokens dropped."""
        out = []
        for i in ids:
            out.append(int(i))
            if out[-1] in self.stop_ids:
                break
        return self._tok.decode(out, skip_special_tokens=True)

    def decode_all(self, ids: Sequence[int]) -> str:
        """Text of every id, special tokens included and no stop: the text a chat template
        renders for them (multi-turn rollouts compare the two)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The chat template rendered for `messages` ([{"role": ..., "content": ...}])."""
        if self.chat_template is None:
            raise TokenizerFilesError(
                f"{self.path}: the tokenizer has no chat template (neither chat_template.jinja "
                f"nor tokenizer_config.json's chat_template), so chat-format prompts cannot be "
                f"rendered (fix: use a model with a chat template, or plain-text prompts)")
        if self._compiled is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ValueError(f"chat template of {self.path}: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            pad_token=self.pad_token or "", unk_token=self.unk_token or "", **kwargs)

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Ids of the rendered chat template (it writes its own BOS, so none is added)."""
        return self.encode(self.apply_chat_template(messages, **kwargs), bos=False)


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    return HFTokenizer(path)
