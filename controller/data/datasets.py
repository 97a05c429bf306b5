"""Text datasets: GSM8K (bundled) and your JSONL / Parquet files, with column mapping.

A loaded row is the file's record plus three fields the loop and rewards rely on:
`prompt` (the text the model continues), `target` (the reference, may be None) and `line` (the
1-based line of a JSONL file, or row of a Parquet file). A record that cannot become a row (not
valid JSON, a missing column, an empty prompt, a prompt longer than the prompt budget
(controller/data/budget.py) without `data.truncate_prompts`, a GSM8K answer without `####`) is
a *bad row*: it is skipped, counted and reported with its line number and reason (a warning at
load, and `TextDataset.bad_rows`). Nothing is dropped silently, and a file with no good row is an
error.

The bundled GSM8K data (`controller/assets/gsm8k/`, MIT licence, OpenAI 2021): the full test
split (1,319 rows) and the first 1,000 rows of the train split.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from controller.config import DataConfig
from controller.data.batch import PromptBatch, batch_from_ids
from controller.data.budget import PromptBudget
from controller.storage import stage

ASSETS = Path(__file__).parents[1] / "assets"
GSM8K_FILES = {"train": "train_first1000.jsonl", "test": "test.jsonl"}

# The default GSM8K prompt; the `format` reward checks the tags it asks for, `gsm8k` reads the
# number in <answer>. Override with data.prompt_template (fields: question, answer).
GSM8K_TEMPLATE = (
    "Solve the problem. Reason inside <think></think>, then give only the final number inside "
    "<answer></answer>.\nProblem: {question}\n"
)


class DataError(ValueError):
    """A dataset that cannot be used at all; the message names the file and a fix."""


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass(frozen=True)
class LoadedRows:
    rows: list[dict[str, Any]]
    bad: list[BadRow]
    source: str

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.bad)

    def report(self, limit: int = 5) -> str:
        """`3 of 100 rows of f.jsonl are bad and skipped: line 4: ...; lines 7, 9: ...`
        (rows with the same reason are listed together)."""
        if not self.bad:
            return f"{self.total} rows of {self.source}, none bad"
        by_reason: dict[str, list[int]] = {}
        for b in self.bad:
            by_reason.setdefault(b.reason, []).append(b.line)
        shown = []
        for reason, lines in list(by_reason.items())[:limit]:
            more = f" and {len(lines) - 3} more" if len(lines) > 3 else ""
            which = ", ".join(map(str, lines[:3]))
            shown.append(f"line{'s' if len(lines) > 1 else ''} {which}{more}: {reason}")
        rest = len(by_reason) - limit
        tail = f"; ... {rest} more kinds of bad row" if rest > 0 else ""
        return (f"{len(self.bad)} of {self.total} rows of {self.source} are bad and skipped: "
                f"{'; '.join(shown)}{tail}")

    def fix(self) -> str:
        """What to change when no row is usable, from the reasons the rows were bad."""
        reasons = [b.reason for b in self.bad]
        if not reasons:
            return "the file has no rows: write one JSON object per line"
        if all(r.startswith("not valid JSON") for r in reasons):
            return "write one JSON object per line, e.g. {\"prompt\": \"...\", \"target\": \"...\"}"
        if all("data.max_prompt_tokens" in r for r in reasons):
            return ("raise data.max_prompt_tokens, set data.truncate_prompts=true to keep the "
                    "end of each prompt, or shorten the prompts")
        if all("max_position_embeddings" in r for r in reasons):
            return ("data.truncate_prompts=true to keep the end of each prompt, a smaller "
                    "sampling.max_new_tokens, or shorter prompts")
        return ("map the file's columns, e.g. data.columns={prompt: question, target: answer}, "
                "or set data.prompt_template over its fields")


def gsm8k_path(split: str) -> Path:
    return ASSETS / "gsm8k" / GSM8K_FILES[split]


def read_records(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    """(line, record) for each record; a record that does not parse is an Exception."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("data.task=parquet needs pyarrow (fix: pip install pyarrow)") from e
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's own errors: not Parquet, truncated, ...
            raise DataError(f"data.path={str(path)!r} is not a readable Parquet file "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}) (fix: "
                            f"point it at a .parquet file, or use data.task=jsonl for JSON "
                            f"lines)") from None
        yield from enumerate(records, start=1)
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines are not rows
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, e


def load_rows(path: str | Path, fmt: str = "jsonl", *, columns: Mapping[str, str] | None = None,
              template: str | None = None, gsm8k: bool = False, tokenizer: Any = None,
              max_prompt_tokens: int | None = None) -> LoadedRows:
    """Reads a JSONL or Parquet file into rows; bad records are collected, not raised.

    Args:
      path: the file.
      fmt: "jsonl" or "parquet".
      columns: row field -> file column for "prompt" and "target" (default: same names).
      template: a format string over the record's fields that makes the prompt (instead of the
        mapped prompt column).
      gsm8k: the target is the number after `####` in the `answer` column.
      tokenizer, max_prompt_tokens: prompts longer than this many tokens are bad rows.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path={str(path)!r} does not exist (fix: check the path; a relative "
                        f"path is read from the current directory, {Path.cwd()})")
    columns = dict(columns or {})
    prompt_col = columns.get("prompt", "prompt")
    target_col = columns.get("target", "answer" if gsm8k else "target")
    rows: list[dict[str, Any]] = []
    bad: list[BadRow] = []
    for line, rec in read_records(p, fmt):
        reason = None
        if isinstance(rec, Exception):
            reason = f"not valid JSON ({rec})"
        elif not isinstance(rec, dict):
            reason = f"a {type(rec).__name__}, not an object"
        if reason:
            bad.append(BadRow(line, reason))
            continue
        try:
            row = _make_row(rec, prompt_col, target_col, template, gsm8k,
                            target_required="target" in columns or gsm8k)
        except _BadRecord as e:
            bad.append(BadRow(line, str(e)))
            continue
        if tokenizer is not None and max_prompt_tokens is not None:
            n = len(tokenizer.encode(row["prompt"]))
            if n > max_prompt_tokens:
                bad.append(BadRow(line, f"prompt is {n} tokens, more than "
                                        f"data.max_prompt_tokens={max_prompt_tokens}"))
                continue
        row["line"] = line
        rows.append(row)
    return LoadedRows(rows, bad, str(p))


class _BadRecord(Exception):
    pass


def _make_row(rec: dict[str, Any], prompt_col: str, target_col: str, template: str | None,
              gsm8k: bool, target_required: bool) -> dict[str, Any]:
    if template is not None:
        try:
            prompt = template.format_map(rec)
        except KeyError as e:
            raise _BadRecord(f"data.prompt_template needs field {e.args[0]!r}, which this row "
                             f"lacks (its fields: {sorted(rec)})") from None
        except (IndexError, ValueError) as e:
            raise _BadRecord(f"data.prompt_template cannot be filled: {e}") from None
    elif prompt_col not in rec:
        raise _BadRecord(f"no column {prompt_col!r} (its fields: {sorted(rec)}; fix: "
                         f"data.columns={{prompt: <column>}} or data.prompt_template)")
    else:
        prompt = rec[prompt_col]
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRecord(f"the prompt is {prompt!r}, not a non-empty string")
    target = rec.get(target_col)
    if target is None and target_required:
        raise _BadRecord(f"no column {target_col!r} for the target (its fields: {sorted(rec)})")
    if gsm8k:
        if not isinstance(target, str) or "####" not in target:
            raise _BadRecord(f"the GSM8K answer has no '####' final answer: {target!r:.60}")
        target = target.rsplit("####", 1)[1].strip()
        if not target:
            raise _BadRecord("the GSM8K answer is empty after '####'")
    return {**rec, "prompt": prompt, "target": target}


def fit_budget(loaded: LoadedRows, tokenizer: Any, budget: PromptBudget
               ) -> tuple[LoadedRows, int]:
    """`loaded` with each prompt longer than the budget moved to the bad rows, or, when the
    budget truncates, kept; returns (rows, how many of the kept rows are over the budget)."""
    rows: list[dict[str, Any]] = []
    bad = list(loaded.bad)
    over = 0
    for row in loaded.rows:
        n = len(tokenizer.encode(row["prompt"]))
        if n <= budget.tokens or budget.truncate:
            rows.append(row)
            over += n > budget.tokens
        else:
            bad.append(BadRow(row["line"], f"prompt is {n} tokens, more than {budget.source}"))
    bad.sort(key=lambda b: b.line)
    return LoadedRows(rows, bad, loaded.source), over


class TextDataset:
    """Rows from a file, served in a seeded per-epoch order; `position` = rows handed out.

    Row i of the stream is rows[perm_e[i mod N]] with e = i // N and perm_e a permutation
    seeded by (seed, e) (the identity when `shuffle` is off), so a resumed run continues with
    the same rows from its position alone. Prompt widths are padded up to a multiple of
    a power of two, so the sampler and trainer compile for a few widths, not one per batch.
    """

    min_width = 64

    def __init__(self, cfg: DataConfig, tokenizer: Any, position: int = 0, *,
                 budget: PromptBudget | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.position = position
        # P_max; `controller.data.build_dataset` passes the one that accounts for the model.
        self.budget = budget or PromptBudget.from_data(cfg)
        self._perm: tuple[int, Any] = (-1, None)
        # A gs:// file is read from its local staged copy (controller/storage.py).
        if cfg.task == "gsm8k":
            path = stage(cfg.path, "data.path") if cfg.path else gsm8k_path(cfg.split)
            loaded = load_rows(path, "jsonl", columns=cfg.columns,
                               template=cfg.prompt_template or GSM8K_TEMPLATE, gsm8k=True)
        else:
            assert cfg.path is not None  # the config validator requires it
            loaded = load_rows(stage(cfg.path, "data.path"), cfg.task, columns=cfg.columns,
                               template=cfg.prompt_template)
        loaded, over = fit_budget(loaded, tokenizer, self.budget)
        self.loaded = loaded
        self.rows = loaded.rows
        self.bad_rows = loaded.bad
        if not self.rows:
            where = (f"data.path={cfg.path!r}" if cfg.path else
                     f"data.split={cfg.split} (the bundled GSM8K rows)")
            raise DataError(f"{where} has no usable rows: {loaded.report()} (fix: "
                            f"{loaded.fix()})")
        if self.bad_rows:
            warnings.warn(f"data: {loaded.report()}", stacklevel=2)
        if over:
            warnings.warn(f"data: {over} of {len(self.rows)} prompts of {loaded.source} are "
                          f"longer than {self.budget.source} and are left-truncated to "
                          f"{self.budget.tokens} tokens (data.truncate_prompts=true)",
                          stacklevel=2)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, index: int) -> dict[str, Any]:
        n = len(self.rows)
        epoch, i = divmod(index, n)
        if self.cfg.shuffle:
            if self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.cfg.seed, epoch]).permutation(n))
            i = int(self._perm[1][i])
        return self.rows[i]

    def next_batch(self, n: int | None = None) -> PromptBatch:
        n = n or self.cfg.prompts_per_step
        rows = [self.row(self.position + i) for i in range(n)]
        self.position += n
        ids = [self.tokenizer.encode(r["prompt"]) for r in rows]
        # Power-of-two widths (at least `min_width`): a handful of sampler and trainer
        # compilations for the whole run instead of one per batch.
        return batch_from_ids(rows, ids, self.tokenizer, min_width=self.min_width,
                              max_tokens=self.budget.tokens if self.budget.truncate else None)
