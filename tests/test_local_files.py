"""`load_rows`, the one loader of local data files: every layout it reads, and what it refuses (naming the file, the
line and the fix). The file-format errors met through `trl-midalign probe --data` are in test_bad_input_cli.py."""

import json

import pytest
from datasets import Dataset, DatasetDict
from testing_utils import write_jsonl

from trl_midalign.local_files import load_rows


ROWS = [{"prompt": "Play some jazz", "completion": "genre: jazz"}, {"prompt": "Wake me up", "completion": "time: now"}]


def test_single_files_of_every_format_give_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    (tmp_path / "rows.csv").write_text("prompt,completion\nPlay some jazz,genre: jazz\nWake me up,time: now\n")
    (tmp_path / "rows.tsv").write_text("prompt\tcompletion\nPlay some jazz\tgenre: jazz\nWake me up\ttime: now\n")
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    for extension in ("jsonl", "json", "csv", "tsv", "parquet"):
        rows = load_rows(tmp_path / f"rows.{extension}", required_columns=("prompt", "completion"))
        assert isinstance(rows, Dataset) and rows.to_list() == ROWS, extension


def test_folders_of_splits_and_saved_datasets(tmp_path):
    write_jsonl(tmp_path / "splits" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "splits" / "test-00000-of-00002.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "splits" / "test-00001-of-00002.jsonl", ROWS[1:])
    assert load_rows(tmp_path / "splits").to_list() == ROWS
    assert load_rows(tmp_path / "splits", split="test").to_list() == ROWS  # the shards, in order
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\], none for 'validation'.*validation\.jsonl"):
        load_rows(tmp_path / "splits", split="validation")

    write_jsonl(tmp_path / "unnamed" / "pairs.jsonl", ROWS)  # no file named after a split: all of it is "train"
    assert load_rows(tmp_path / "unnamed").to_list() == ROWS

    DatasetDict({"train": Dataset.from_list(ROWS), "dev": Dataset.from_list(ROWS[:1])}).save_to_disk(tmp_path / "dd")
    assert load_rows(tmp_path / "dd", split="dev").to_list() == ROWS[:1]
    with pytest.raises(ValueError, match=r"has the splits \['train', 'dev'\], not 'test'"):
        load_rows(tmp_path / "dd", split="test")
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    assert load_rows(tmp_path / "saved", required_columns=["prompt"]).to_list() == ROWS
    with pytest.raises(ValueError, match=r"saved: no 'text' column .*--text_column"):
        load_rows(tmp_path / "saved", required_columns={"text": "--text_column"})


def test_refusals_name_the_file_the_line_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(
        ValueError, match=r"rows\.jsonl is a single file, which holds only the 'train' split, not 'test'"
    ):
        load_rows(path, split="test", option="--dataset_name")
    with pytest.raises(FileNotFoundError, match=r"--dev_file '.*missing\.jsonl' does not exist"):
        load_rows(tmp_path / "missing.jsonl", option="--dev_file")
    with pytest.raises(
        ValueError, match=r"rows\.jsonl, line 1: no 'text' \(columns there: \['completion', 'prompt'\]\)"
    ):
        load_rows(path, required_columns=["text"])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "n": 1}, {"prompt": "b", "n": "two"}])
    with pytest.raises(
        ValueError, match=r"mixed\.jsonl: the column 'n' mixes value types \(int at line 1, str at line 2\)"
    ):
        load_rows(mixed)
    ragged = write_jsonl(tmp_path / "ragged.jsonl", [ROWS[0], {"prompt": "b"}])
    with pytest.raises(ValueError, match=r"ragged\.jsonl, line 2: no 'completion', which the other rows have"):
        load_rows(ragged)
    (tmp_path / "rows.txt").write_text("Play some jazz\n")
    with pytest.raises(ValueError, match=r"Cannot read .*rows\.txt .*use a JSONL, JSON, CSV, TSV or Parquet file"):
        load_rows(tmp_path / "rows.txt")
