"""Prompts for a job: tokenizers, datasets and the prompt-batch encoder.

    tokenizer.py     the `Tokenizer` protocol; character and byte tokenizers
    hf_tokenizer.py  a Hugging Face model directory's tokenizer and chat template
    synthetic.py     random-id prompts and their tokenizer (benchmarks)
    tasks.py         built-in generated tasks (`reverse_digits`, `synthetic`)
    datasets.py      file datasets: bundled GSM8K, JSONL, Parquet
    budget.py        the prompt budget: data.max_prompt_tokens against the model's positions
    batch.py         rows -> the left-padded `PromptBatch` (left truncation to the budget)
    chat.py          a multi-turn row's turns as tokens: the chat template, or concatenation

Every dataset has `position` (rows handed out, the resumable data position) and
`next_batch(n) -> PromptBatch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controller.config import JobConfig
    from controller.data.datasets import TextDataset
    from controller.data.tasks import TaskDataset
    from controller.data.tokenizer import Tokenizer


def build_tokenizer(cfg: JobConfig) -> Tokenizer:
    """The tokenizer the job's model and task use: model.path's own, else the task's."""
    if cfg.model.path:
        from controller.data.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(cfg.model.path)
    if cfg.data.task == "synthetic":
        from controller.data.synthetic import SyntheticTokenizer
        from controller.data.tasks import SYNTHETIC_VOCAB

        return SyntheticTokenizer(cfg.model.vocab_size or SYNTHETIC_VOCAB)
    if cfg.data.task != "reverse_digits":  # text tasks: any UTF-8 text on the built-in model
        from controller.data.tokenizer import ByteTokenizer

        return ByteTokenizer()
    from controller.data.tasks import digits_tokenizer

    if cfg.env.name is not None:  # the characters a multi-turn environment writes, too
        from rewards.environments import load_environment

        return digits_tokenizer(load_environment(cfg.env.name).alphabet)
    return digits_tokenizer()


def build_dataset(cfg: JobConfig, tokenizer: Tokenizer, position: int = 0
                  ) -> TaskDataset | TextDataset:
    """The prompt source named by `data.task`, starting at `position` rows.

    Raises ConfigError when data.max_prompt_tokens + sampling.max_new_tokens cannot fit in
    model.path's positions (`controller.data.budget.prompt_budget`), before any row is read.
    """
    from controller.data.budget import prompt_budget

    budget = prompt_budget(cfg)
    if cfg.data.task in ("gsm8k", "jsonl", "parquet"):
        from controller.data.datasets import TextDataset

        return TextDataset(cfg.data, tokenizer, position, budget=budget)
    from controller.data.tasks import TaskDataset

    return TaskDataset(cfg.data, tokenizer, position, budget=budget)
