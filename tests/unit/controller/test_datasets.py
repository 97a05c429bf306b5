"""Text datasets: bundled GSM8K, JSONL/Parquet with column mapping, bad rows, byte tokenizer."""

import json

import pytest

from controller.config import ConfigError, DataConfig, load_config
from controller.data import build_dataset, build_tokenizer
from controller.data.datasets import (
    GSM8K_TEMPLATE,
    DataError,
    TextDataset,
    gsm8k_path,
    load_rows,
)
from controller.data.tokenizer import ByteTokenizer


def test_byte_tokenizer_round_trips_any_text_and_stops_at_eos():
    tok = ByteTokenizer()
    text = "Janet’s ducks lay 16 eggs — $2 each. 😀"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.vocab_size == 259
    assert all(3 <= i < tok.vocab_size for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.decode([*tok.encode("ab", bos=False), tok.stop_id, *tok.encode("cd")]) == "ab"
    assert tok.decode([tok.pad_id, *tok.encode("x", bos=False), tok.pad_id]) == "x"
    assert tok.decode(tok.encode("é", bos=False)[:1]) == "\ufffd"  # a cut character


def test_bundled_gsm8k_splits_load_without_bad_rows():
    tok = ByteTokenizer()
    test = load_rows(gsm8k_path("test"), template=GSM8K_TEMPLATE, gsm8k=True, tokenizer=tok,
                     max_prompt_tokens=2048)
    assert len(test.rows) == 1319 and test.bad == []
    first = test.rows[0]
    assert first["target"] == "18" and first["line"] == 1
    assert first["prompt"] == GSM8K_TEMPLATE.format(question=first["question"])
    assert "#### 18" in first["answer"]  # the original fields stay for rewards
    train = load_rows(gsm8k_path("train"), template=GSM8K_TEMPLATE, gsm8k=True)
    assert len(train.rows) == 1000 and train.bad == []
    assert (gsm8k_path("test").parent / "LICENSE").read_text().startswith("MIT License")


def test_bad_rows_are_counted_with_line_numbers_not_crashed_on(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"question": "1+1?", "answer": "#### 2"}),  # 1 good
        "{not json",  # 2
        json.dumps({"question": "2+2?"}),  # 3 no answer
        "",  # blank: not a row
        json.dumps(["a", "list"]),  # 5
        json.dumps({"question": "3+3?", "answer": "six"}),  # 6 no ####
        json.dumps({"question": "x" * 300, "answer": "#### 1"}),  # 7 too long
        json.dumps({"question": "4+4?", "answer": "#### 8"}),  # 8 good
    ]
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(task="gsm8k", path=str(path), prompt_template="Q: {question}\nA:",
                     max_prompt_tokens=100, prompts_per_step=2)
    with pytest.warns(UserWarning, match=r"5 of 7 rows of .*mixed.jsonl are bad") as w:
        ds = TextDataset(cfg, ByteTokenizer())
    assert [r["line"] for r in ds.rows] == [1, 8]
    assert [b.line for b in ds.bad_rows] == [2, 3, 5, 6, 7]
    reasons = dict((b.line, b.reason) for b in ds.bad_rows)
    assert "not valid JSON" in reasons[2]
    assert "no column 'answer'" in reasons[3]
    assert "list, not an object" in reasons[5]
    assert "no '####'" in reasons[6]
    assert "more than data.max_prompt_tokens=100" in reasons[7]
    assert "line 2: not valid JSON" in str(w[0].message)


def test_a_file_with_no_good_row_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match="no usable rows.*no column 'prompt'"):
        TextDataset(DataConfig(task="jsonl", path=str(path)), ByteTokenizer())
    with pytest.raises(DataError, match="does not exist"):
        TextDataset(DataConfig(task="jsonl", path=str(tmp_path / "nope.jsonl")), ByteTokenizer())


def test_jsonl_and_parquet_with_column_mapping(tmp_path):
    records = [{"q": f"What is {i}+{i}?", "a": str(2 * i), "id": i} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    for task, path in (("jsonl", jsonl), ("parquet", parquet)):
        cfg = DataConfig(task=task, path=str(path), columns={"prompt": "q", "target": "a"},
                         shuffle=False, prompts_per_step=2)
        ds = TextDataset(cfg, ByteTokenizer())
        assert [(r["prompt"], r["target"], r["id"], r["line"]) for r in ds.rows] == [
            (f"What is {i}+{i}?", str(2 * i), i, i + 1) for i in range(5)]
    # A template over the record's fields instead of a prompt column.
    rows = load_rows(jsonl, columns={"target": "a"}, template="[{id}] {q}").rows
    assert rows[3]["prompt"] == "[3] What is 3+3?" and rows[3]["target"] == "6"


def test_text_dataset_batches_are_left_padded_resumable_and_cover_each_epoch(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * (i + 1)}) + "\n" for i in range(7)))
    cfg = DataConfig(task="jsonl", path=str(path), prompts_per_step=3, seed=5)
    ds = TextDataset(cfg, ByteTokenizer())
    batches = [ds.next_batch() for _ in range(7)]  # 21 rows = 3 epochs of 7
    for e in range(3):
        epoch = [r["line"] for b in batches for r in b.rows][7 * e: 7 * e + 7]
        assert sorted(epoch) == list(range(1, 8))  # each epoch is a permutation
    b = batches[0]
    assert b.tokens_PxL.shape[1] == 64  # power-of-two width, at least 64
    assert b.mask_PxL[:, -1].all() and not b.mask_PxL[:, 0].any()
    resumed = TextDataset(cfg, ByteTokenizer(), position=9)
    assert resumed.next_batch().rows == batches[3].rows


def test_config_selects_text_task_tokenizer_and_dataset():
    cfg = load_config(overrides=["data.task=gsm8k", "data.split=test",
                                 "rewards.functions=[gsm8k]"])
    tok = build_tokenizer(cfg)
    assert isinstance(tok, ByteTokenizer)
    ds = build_dataset(cfg, tok, position=0)
    assert len(ds) == 1319
    with pytest.raises(ConfigError, match="data.path is required for data.task=jsonl"):
        load_config(overrides=["data.task=jsonl"])
    with pytest.raises(ConfigError, match="uses reverse_digits, the reward of the"):
        load_config(overrides=["data.task=gsm8k"])  # the default reward does not fit
    with pytest.raises(ConfigError, match=r"unknown row fields \['answer'\]"):
        load_config(overrides=["data.columns={answer: a}"])
