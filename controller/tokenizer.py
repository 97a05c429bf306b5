"""A character tokenizer for the built-in tasks (no files, no network)."""

from __future__ import annotations

from collections.abc import Sequence


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

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a completion (the sampler's stop set)."""
        return (self.stop_id,)

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
