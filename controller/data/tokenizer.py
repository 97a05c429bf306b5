"""The tokenizer interface, and the two built-in tokenizers (no files, no network).

Every tokenizer a job uses satisfies `Tokenizer`: `CharTokenizer` (the built-in tasks),
`ByteTokenizer` (text tasks on the built-in model), `SyntheticTokenizer` (benchmarks) and
`HFTokenizer` (a Hugging Face model directory, `model.path`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Tokenizer(Protocol):
    """What the loop, the datasets and the sampler need of a tokenizer."""

    pad_id: int  # fills masked prompt columns; any valid id
    bos_id: int | None  # the id a prompt starts with (kept by left truncation); None: no BOS
    stop_ids: tuple[int, ...]  # the ids that end a completion

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids up to the first stop id."""
        ...


class CharTokenizer:
    """One token per character of `alphabet`, plus <pad> and <bos>.

    The stop character ends a completion; it is part of the alphabet, so it is visible in text.
    """

    def __init__(self, alphabet: str, stop: str):
        if stop not in alphabet:
            raise ValueError(f"stop character {stop!r} is not in the alphabet {alphabet!r}")
        self.specials = ["<pad>", "<bos>"]
        self.alphabet = alphabet
        self._ids = {c: i + len(self.specials) for i, c in enumerate(alphabet)}
        self.pad_id, self.bos_id = 0, 1
        self.stop_id = self._ids[stop]
        self.stop_ids = (self.stop_id,)  # the ids that end a completion (the sampler's set)

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.alphabet)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:
            raise ValueError(f"text {text!r} has characters outside the alphabet: {unknown}")
        return ([self.bos_id] if bos else []) + [self._ids[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids, stopping after the stop token; specials are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.specials):
                continue
            out.append(self.alphabet[i - len(self.specials)])
            if i == self.stop_id:
                break
        return "".join(out)


class ByteTokenizer:
    """UTF-8 bytes as tokens (byte b -> id b + 3), plus <pad>, <bos> and <eos>: any text.

    For text tasks (GSM8K, your JSONL) on the built-in model. <eos> is the stop token; it is
    not part of the decoded text. The same interface as `CharTokenizer`.
    """

    specials = ("<pad>", "<bos>", "<eos>")
    pad_id, bos_id, stop_id = 0, 1, 2
    stop_ids = (2,)

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + 256

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        offset = len(self.specials)
        return ([self.bos_id] if bos else []) + [b + offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids up to (not including) <eos>; a cut multi-byte character becomes
        U+FFFD."""
        offset = len(self.specials)
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.stop_id:
                break
            if i >= offset:
                out.append(i - offset)
        return out.decode("utf-8", errors="replace")
