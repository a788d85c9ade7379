"""Bad input at the command line and what a new user meets: `trl-midalign probe --data` files that cannot be read,
probe settings and folders that cannot give a layer (max_length < 2, indistinguishable scores, no tokenizer files),
Hub tokens and local files that must not leave the machine or reach the disk, and the demo's output.

Nothing is downloaded: tiny models come from configs (conftest.py), data files and Debian packages are written here,
and the Hub transport (`HfApi.create_repo` / `HfApi.create_commit`) is replaced by a recorder.
"""

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import types
import warnings

import pytest
from testing_utils import build_model, build_tokenizer, load_script

from trl_midalign.cli import main as cli_main
from trl_midalign.probing import ProbeResult


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")

PAIRS = [  # (language, source, target)
    ("de", "Weck mich um sieben Uhr", "Wake me up at seven"),
    ("de", "Spiele etwas Jazz", "Play some jazz"),
    ("de", "Schalte das Licht aus", "Turn off the light"),
    ("fr", "Joue du jazz", "Play jazz music"),
    ("fr", "Éteins la lumière", "Switch the light off"),
    ("fr", "Quel temps fera-t-il demain", "What will the weather be tomorrow"),
]


def pair_rows() -> list[dict]:
    return [{"language": lang, "parallel_source": s, "parallel_target": t} for lang, s, t in PAIRS]


def jsonl_lines(rows=None) -> list[bytes]:
    return [json.dumps(row, ensure_ascii=False).encode("utf-8") for row in (rows or pair_rows())]


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# `trl-midalign probe --data FILE`: files that cannot be read as pairs
#
# Each case: (file name, file bytes, the exception's message must match all of these regexes). Every message names the
# file, the line (or item) and the fix. `{path}` is replaced by the file's path.
LINES = jsonl_lines()
BAD_FILES = {
    "jsonl_malformed_line": (
        "pairs.jsonl",
        b"\n".join(
            [*LINES[:2], b'{"language": "de", "parallel_source": "Hallo" "parallel_target": "Hi"}', *LINES[2:]]
        ),
        [r"pairs\.jsonl, line 3: not valid JSON", r"Expecting ',' delimiter", r"Fix or remove that line"],
    ),
    "jsonl_cut_short": (  # a writer killed mid-line
        "pairs.jsonl",
        b"\n".join(LINES) + b'\n{"language": "fr", "parallel_sou',
        [r"pairs\.jsonl, line 7: not valid JSON", r"one complete JSON object"],
    ),
    "jsonl_invalid_utf8": (
        "pairs.jsonl",
        b"\n".join(
            [
                LINES[0],
                '{"language": "fr", "parallel_source": "Éteins", "parallel_target": "Off"}'.encode("latin-1"),
                *LINES[1:],
            ]
        ),
        [r"pairs\.jsonl, line 2: not valid UTF-8", r"byte 0xc9", r"iconv -f LATIN1 -t UTF-8"],
    ),
    "jsonl_utf16": (
        "pairs.jsonl",
        "\n".join(line.decode() for line in LINES).encode("utf-16"),
        [r"pairs\.jsonl is UTF-16 encoded", r"iconv -f UTF-16 -t UTF-8"],
    ),
    "jsonl_empty": ("pairs.jsonl", b"", [r"pairs\.jsonl is empty: it holds no pairs", r"one pair per line"]),
    "jsonl_only_blank_lines": ("pairs.jsonl", b"\n  \n\r\n", [r"pairs\.jsonl is empty"]),
    "jsonl_line_is_a_list": (
        "pairs.jsonl",
        b"\n".join([LINES[0], b'["de", "Hallo", "Hello"]', *LINES[1:]]),
        [r"pairs\.jsonl, line 2: a JSON list", r"expected an object with the pair's columns"],
    ),
    "jsonl_missing_target_column": (
        "pairs.jsonl",
        b"\n".join([*LINES[:3], b'{"language": "de", "parallel_source": "Hallo", "target": "Hello"}']),
        [r"pairs\.jsonl, line 4: no 'parallel_target'", r"--target_column"],
    ),
    "jsonl_language_on_some_lines_only": (
        "pairs.jsonl",
        b"\n".join([*LINES[:4], b'{"parallel_source": "Hallo", "parallel_target": "Hello"}']),
        [r"pairs\.jsonl, line 5: no 'language', which the other rows have"],
    ),
    "json_malformed": (
        "pairs.json",
        json.dumps(pair_rows(), indent=1, ensure_ascii=False).replace('"fr",', '"fr"', 1).encode(),
        [r"pairs\.json, line \d+: not valid JSON", r"a list of objects"],
    ),
    "json_lines_in_a_json_file": (
        "pairs.json",
        b"\n".join([*LINES[:4], b'{"language": "fr", "parallel_source": }', *LINES[4:]]),
        [r"pairs\.json, line 5: not valid JSON"],
    ),
    "json_empty_list": ("pairs.json", b"[]\n", [r"pairs\.json holds no pairs"]),
    "json_a_single_string": ("pairs.json", b'"Hallo"', [r"pairs\.json holds a single JSON str"]),
    "json_item_not_an_object": (
        "pairs.json",
        json.dumps([*pair_rows()[:2], 42]).encode(),
        [r"pairs\.json, item 2 of its top-level list: a JSON int"],
    ),
    "json_columns_of_different_lengths": (
        "pairs.json",
        json.dumps({"parallel_source": ["a", "b"], "parallel_target": ["x"]}).encode(),
        [r"pairs\.json holds columns of different lengths", r"'parallel_target': 1"],
    ),
    "csv_wrong_field_count": (
        "pairs.csv",
        b"language,parallel_source,parallel_target\nde,Hallo,Hello\nde,Guten Tag, wie geht es,Good day\n",
        [r"pairs\.csv, line 3: 4 field\(s\), but the header has 3", r"Quote fields that contain the delimiter"],
    ),
    "csv_quote_never_closed": (
        "pairs.csv",
        b'language,parallel_source,parallel_target\nde,Hallo,Hello\nde,"Tschuess,Bye\nde,Danke,Thanks\n',
        [r"pairs\.csv, line 3: not valid CSV", r"quoted field must be closed"],
    ),
    "csv_header_only": (
        "pairs.csv",
        b"language,parallel_source,parallel_target\n",
        [r"pairs\.csv has a header line .* but no rows"],
    ),
    "csv_empty": ("pairs.csv", b"", [r"pairs\.csv is empty", r"CSV/TSV file with a header line"]),
    "csv_invalid_utf8": (
        "pairs.csv",
        "language,parallel_source,parallel_target\nde,Hallo,Hello\nfr,Éteins,Off\n".encode("cp1252"),
        [r"pairs\.csv, line 3: not valid UTF-8"],
    ),
    "csv_missing_column": (
        "pairs.csv",
        b"language,source,parallel_target\nde,Hallo,Hello\nde,Danke,Thanks\n",
        [r"pairs\.csv, line 2: no 'parallel_source'", r"--source_column"],
    ),
    "csv_duplicated_header": (
        "pairs.csv",
        b"language,parallel_source,parallel_source,parallel_target\nde,a,b,c\n",
        [r"pairs\.csv, line 1: the header names the column\(s\) \['parallel_source'\] more than once"],
    ),
    "tsv_wrong_field_count": (
        "pairs.tsv",
        b"language\tparallel_source\tparallel_target\nde\tHallo\tHello\nde\tDanke\n",
        [r"pairs\.tsv, line 3: 2 field\(s\), but the header has 3", r"'\\t'"],
    ),
    "parquet_not_parquet": (
        "pairs.parquet",
        b"this is not a parquet file\n" * 4,
        [r"--data '.*pairs\.parquet' could not be read by datasets", r"valid file of its format"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_probe_data_file_errors_name_the_file_line_and_fix(case, tmp_path, tiny_model_dir):
    name, content, patterns = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    before = sha256(path)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as raised:
        cli_main(["probe", "--model_name_or_path", tiny_model_dir, "--data", str(path), "--output_dir", str(out)])
    message = str(raised.value)
    assert str(path) in message, message  # the full path of the file, not only its name
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert sha256(path) == before  # the input is never changed
    assert not out.exists()  # nothing written before the data was read


GOOD_FILES = {
    "jsonl_with_bom_crlf_and_blank_lines": (
        "pairs.jsonl",
        b"\xef\xbb\xbf" + b"\r\n".join([*LINES[:3], b"", *LINES[3:]]) + b"\r\n\r\n",
    ),
    "jsonl_with_a_line_separator_inside_a_string": (  # U+2028 is legal inside JSON strings: not a line break
        "pairs.jsonl",
        b"\n".join(
            [
                *LINES[:5],
                json.dumps(
                    dict(pair_rows()[5], parallel_target="What will\u2028the weather be"), ensure_ascii=False
                ).encode(),
            ]
        ),
    ),
    "json_list": ("pairs.json", json.dumps(pair_rows(), indent=2, ensure_ascii=False).encode()),
    "json_columns": (
        "pairs.json",
        json.dumps({key: [row[key] for row in pair_rows()] for key in pair_rows()[0]}, ensure_ascii=False).encode(),
    ),
    "json_lines_in_a_json_file": ("pairs.json", b"\n".join(LINES)),
    "csv_with_quoted_delimiters": (
        "pairs.csv",
        (
            "language,parallel_source,parallel_target\n"
            + "".join(f'{lang},"{s}, ja","{t}, yes"\n' for lang, s, t in PAIRS)
        ).encode(),
    ),
    "tsv": (
        "pairs.tsv",
        (
            "language\tparallel_source\tparallel_target\n" + "".join(f"{lang}\t{s}\t{t}\n" for lang, s, t in PAIRS)
        ).encode(),
    ),
}


@pytest.mark.parametrize("case", sorted(GOOD_FILES))
def test_probe_reads_valid_files_of_every_format(case, tmp_path, tiny_model_dir, capsys):
    name, content = GOOD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    before = sha256(path)
    out = tmp_path / "out"
    cli_main(["probe", "--model_name_or_path", tiny_model_dir, "--data", str(path), "--output_dir", str(out),
              "--no_plot", "--batch_size", "4"])  # fmt: skip
    result = ProbeResult.from_json(out / "probe.json")
    assert result.languages == ["de", "fr"]
    assert result.num_pairs == {"de": 3, "fr": 3}
    assert result.layers == [0, 1, 2, 3, 4]
    assert sha256(path) == before


def test_probe_reads_the_same_pairs_from_every_format(tmp_path, tiny_model_dir):
    """The stdlib readers give the probe the same sentences as the JSONL file: identical scores."""
    scores = {}
    for name, content in (("pairs.jsonl", b"\n".join(LINES)), GOOD_FILES["tsv"], GOOD_FILES["json_columns"]):
        path = tmp_path / name
        path.write_bytes(content)
        out = tmp_path / f"out-{name}"
        cli_main(["probe", "--model_name_or_path", tiny_model_dir, "--data", str(path), "--output_dir", str(out),
                  "--no_plot"])  # fmt: skip
        scores[name] = ProbeResult.from_json(out / "probe.json").to_dict()
        scores[name].pop("model_name")
    assert scores["pairs.jsonl"] == scores["pairs.tsv"] == scores["pairs.json"]


@pytest.mark.parametrize("length", ["1", "0", "-3"])
def test_probe_max_length_below_2_is_refused_like_training(length, tmp_path, tiny_model_dir, capsys):
    path, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    path.write_bytes(b"\n".join(LINES))
    with pytest.raises(ValueError, match=f"max_length={length}: a sentence needs at least 2 tokens.*--max_length 2"):
        cli_main(["probe", "--model_name_or_path", tiny_model_dir, "--data", str(path), "--output_dir", str(out),
                  "--max_length", length])  # fmt: skip
    assert not out.exists()
    assert "Recommended layer" not in capsys.readouterr().out


def test_probe_never_recommends_a_layer_from_indistinguishable_scores(tmp_path, tokenizer, capsys):
    import torch

    model = build_model("llama", len(tokenizer))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # every state is 0: every layer scores 0.000
    folder = tmp_path / "zero-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    path.write_bytes(b"\n".join(LINES))
    with pytest.raises(SystemExit, match="No layer can be recommended: every layer above 0 has the same mean retrieval "
                       r"accuracy \(0.000\).*align_layer='middle'") as raised:  # fmt: skip
        cli_main(["probe", "--model_name_or_path", str(folder), "--data", str(path), "--output_dir", str(out),
                  "--no_plot"])  # fmt: skip
    assert raised.value.code != 0
    printed = capsys.readouterr().out
    assert "Recommended layer" not in printed and "use it with align_layer" not in printed
    assert ProbeResult.from_json(out / "probe.json").recommended_layer is None  # the scores are still written
    assert "*" not in ProbeResult.from_json(out / "probe.json").to_markdown()


def test_probe_on_a_model_folder_without_tokenizer_files_names_them(tmp_path, tokenizer):
    folder = tmp_path / "weights-only"
    build_model("llama", len(tokenizer)).save_pretrained(folder)
    path, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    path.write_bytes(b"\n".join(LINES))
    with pytest.raises(FileNotFoundError, match=rf"model folder {folder} holds no tokenizer: none of \['tokenizer.json', "
                       r"'tokenizer.model'.*\['config.json', 'generation_config.json', 'model.safetensors'\].*"
                       r"tokenizer.save_pretrained"):  # fmt: skip
        cli_main(["probe", "--model_name_or_path", str(folder), "--data", str(path), "--output_dir", str(out)])
    assert not out.exists()


def test_probe_refuses_pairs_with_identical_sides_and_an_output_dir_that_is_a_file(tmp_path, tiny_model_dir):
    path, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    copies = [dict(row, parallel_source=row["parallel_target"]) for row in pair_rows()]
    path.write_bytes(b"\n".join(jsonl_lines(copies)))
    with pytest.raises(ValueError, match=r"6 of 6 \(100%\) have the same text in 'parallel_source' and "
                       "'parallel_target'.*--source_column"):  # fmt: skip
        cli_main(["probe", "--model_name_or_path", tiny_model_dir, "--data", str(path), "--output_dir", str(out)])
    path.write_bytes(b"\n".join(LINES))
    out.write_text("a file")
    with pytest.raises(NotADirectoryError, match=f"--output_dir {out}: {out} is an existing file"):
        cli_main(["probe", "--model_name_or_path", tiny_model_dir, "--data", str(path), "--output_dir", str(out)])
    assert out.read_text() == "a file"


def test_probe_data_with_non_string_sentences_is_refused(tmp_path, tiny_model_dir):
    """A sentence that is not a string is an error naming the file, where, and the column; no pair is dropped."""
    path, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    argv = ["probe", "--model_name_or_path", tiny_model_dir, "--data", str(path), "--output_dir", str(out)]
    numbers = [{"language": "de", "parallel_source": 1, "parallel_target": 2}, *pair_rows()]
    path.write_bytes(b"\n".join(jsonl_lines(numbers)))
    with pytest.raises(
        ValueError,
        match=r"pairs\.jsonl: the column 'parallel_source' mixes value types \(int at line 1, str at line 2\)",
    ):
        cli_main(argv)
    nulls = [*pair_rows()[:2], dict(pair_rows()[2], parallel_source=None), *pair_rows()[3:]]
    path.write_bytes(b"\n".join(jsonl_lines(nulls)))
    with pytest.raises(
        ValueError, match=rf"Row 2 of the pairs of {re.escape(str(path))}: column 'parallel_source' holds None"
    ):
        cli_main(argv)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Hub: no token on disk, exactly the recipe's files uploaded, no local path published
class RecordingHub:
    """Replaces the transport of `HfApi.create_repo` / `HfApi.create_commit`; records what would be sent."""

    def __init__(self, monkeypatch):
        import huggingface_hub

        self.repos, self.commits = [], []
        hub = self

        def create_repo(api, repo_id, *args, **kwargs):
            hub.repos.append({"repo_id": repo_id, "token": api.token or huggingface_hub.get_token(), **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def create_commit(api, repo_id, operations, *args, **kwargs):
            files = {}
            for operation in operations:
                source = operation.path_or_fileobj
                if isinstance(source, (str, os.PathLike)):
                    with open(source, "rb") as f:
                        files[operation.path_in_repo] = f.read()
                else:
                    files[operation.path_in_repo] = source if isinstance(source, bytes) else source.read()
            hub.commits.append({"repo_id": repo_id, "files": files, "token": api.token or huggingface_hub.get_token()})
            return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
        for name in ("upload_folder", "upload_file"):  # any other way out fails the test
            monkeypatch.setattr(huggingface_hub.HfApi, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} used"))


def files_containing(root, needle: bytes) -> list[str]:
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                if needle in f.read():
                    found.append(os.path.relpath(os.path.join(directory, name), root))
    return found


MASSIVE = [  # (id, locale, utterance, annotated utterance)
    ("0", "en-US", "wake me up at seven", "wake me up at [time : seven]"),
    ("0", "de-DE", "weck mich um sieben auf", "weck mich um [time : sieben] auf"),
    ("1", "en-US", "play some jazz", "play some [music_genre : jazz]"),
    ("1", "de-DE", "spiele etwas jazz", "spiele etwas [music_genre : jazz]"),
    ("2", "en-US", "turn off the light", "turn off the light"),
    ("2", "de-DE", "schalte das licht aus", "schalte das licht aus"),
    ("3", "en-US", "what is the weather tomorrow", "what is the weather [date : tomorrow]"),
    ("3", "de-DE", "wie wird das wetter morgen", "wie wird das wetter [date : morgen]"),
]
TOKEN = "hf_TestTokenThatMustNeverBeWritten0123456789"


def load_recipe(name: str):
    """The module of `recipes/<name>.py`, loaded from its file (the recipes are scripts, not a package)."""
    return load_script(os.path.join(RECIPES, f"{name}.py"))


def test_recipe_keeps_the_hub_token_off_disk_and_pushes_only_its_own_files(tmp_path, monkeypatch):
    import torch

    from trl_midalign.scripts import PUSH_FILES

    model_dir = tmp_path / "models" / "tiny-llama"
    tokenizer = build_tokenizer()
    build_model("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "massive"
    data.mkdir()
    for split in ("train", "test"):
        with open(data / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, locale, utt, annotated in MASSIVE:
                f.write(json.dumps({"id": i, "locale": locale, "utt": utt, "annot_utt": annotated}) + "\n")

    output_dir = tmp_path / "run"
    # Files the recipe did not write, placed in the output directory beforehand: none of them may be uploaded
    planted = {
        "private/plot.png": b"\x89PNG\r\n\x1a\n not for the Hub",
        "private/secret.txt": b"password=hunter2",
        "notes.png": b"\x89PNG\r\n\x1a\n my own figure",
        "results/eval_results.png": b"\x89PNG\r\n\x1a\n an old one",
    }
    for name, content in planted.items():
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_bytes(content)

    hub = RecordingHub(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_some_other_token")  # restored after the test; --hub_token must win
    module = load_recipe("slot_filling")
    argv = [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--train_languages", "en-US", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--max_new_tokens", "4", "--report_to", "none", "--use_cpu",
        "--save_strategy", "steps", "--save_steps", "1",
        "--hub_token", TOKEN, "--push_to_hub", "--hub_model_id", "tester/tiny-massive",
    ]  # fmt: skip
    module.main(*module.make_parser().parse_args_and_config(argv))

    # transformers pickled the arguments into output_dir and every checkpoint; the token is in none of them
    pickled = sorted(os.path.relpath(os.path.join(d, n), output_dir) for d, _, names in os.walk(output_dir)
                     for n in names if n == "training_args.bin")  # fmt: skip
    assert pickled == ["checkpoint-1/training_args.bin", "checkpoint-2/training_args.bin", "training_args.bin"]
    assert torch.load(output_dir / "training_args.bin", weights_only=False).hub_token is None
    assert files_containing(output_dir, TOKEN.encode()) == []
    assert os.environ["HF_TOKEN"] == TOKEN  # kept in this process's memory for the Hub calls

    # one commit, with the token, holding exactly the files the recipe wrote at the top level
    assert [repo["repo_id"] for repo in hub.repos] == ["tester/tiny-massive"]
    assert len(hub.commits) == 1 and hub.commits[0]["token"] == TOKEN and hub.repos[0]["token"] == TOKEN
    sent = hub.commits[0]["files"]
    expected = {name for name in PUSH_FILES if (output_dir / name).is_file()}
    assert set(sent) == expected
    must = {"adapter_config.json", "adapter_model.safetensors", "README.md", "eval_results.json", "eval_results.png"}
    assert must <= expected and "tokenizer_config.json" in expected
    assert not set(sent) & set(planted)
    assert sent["adapter_model.safetensors"] == (output_dir / "adapter_model.safetensors").read_bytes()

    # no published file holds a local path (the tmp dir, the model's path) or the token
    for name, content in sent.items():
        assert str(tmp_path).encode() not in content, name
        assert TOKEN.encode() not in content, name
    card = sent["README.md"].decode()
    assert "tiny-llama" in card and 'PeftModel.from_pretrained(base, "tester/tiny-massive")' in card
    assert json.loads(sent["adapter_config.json"])["base_model_name_or_path"] == "tiny-llama"
    assert json.loads(sent["eval_results.json"])["model"] == "tiny-llama"
    # the local files keep what a local user needs
    assert json.loads((output_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)


def test_keep_hub_token_off_disk_without_a_token_changes_nothing(tmp_path, monkeypatch):
    from trl_midalign import AlignmentConfig
    from trl_midalign.scripts import keep_hub_token_off_disk

    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    config = AlignmentConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert keep_hub_token_off_disk(config) is False
    assert os.environ["HF_TOKEN"] == "hf_from_the_environment" and config.hub_token is None
    config.hub_token = TOKEN
    import torch

    torch.save(config, tmp_path / "unprotected.bin")  # what transformers does with the arguments, unprotected
    assert files_containing(tmp_path, TOKEN.encode()) == ["unprotected.bin"]  # so the grep above can find it
    assert keep_hub_token_off_disk(config) is True
    assert os.environ["HF_TOKEN"] == TOKEN and config.hub_token is None
    torch.save(config, tmp_path / "protected.bin")
    assert files_containing(tmp_path, TOKEN.encode()) == ["unprotected.bin"]


def write_adapter_folder(folder, base_model: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "base_model_name_or_path": base_model, "r": 8}, f)
    for name, content in {
        "adapter_model.safetensors": b"weights",
        "tokenizer.json": b"{}",
        "README.md": b"card",
        "eval_results.json": b"{}",
        "eval_results.png": b"\x89PNG",
        "training_args.bin": b"pickled arguments",
        "optimizer.pt": b"optimizer",
        "notes.png": b"\x89PNG mine",
        "checkpoint-3/adapter_model.safetensors": b"old weights",
        "checkpoint-3/eval_results.png": b"\x89PNG old",
        "private/plot.png": b"\x89PNG private",
        "private/secret.txt": b"secret",
        "layer_probe/step-4/probe_curve.png": b"\x89PNG probe",
        "layer_probe/step-4/probe.json": b"{}",
    }.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def test_push_run_files_sends_exactly_the_named_files(tmp_path, monkeypatch):
    from trl_midalign.scripts import push_run_files

    folder = str(tmp_path / "run")
    base = str(tmp_path / "models" / "Llama-local")
    write_adapter_folder(folder, base)
    hub = RecordingHub(monkeypatch)
    url = push_run_files(folder, "me/adapter", token="hf_explicit", extra_files=["layer_probe/step-4/probe_curve.png"])
    assert url == "https://huggingface.co/me/adapter/commit/0123"
    sent = hub.commits[0]["files"]
    assert set(sent) == {
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "eval_results.json",
        "eval_results.png", "layer_probe/step-4/probe_curve.png",
    }  # fmt: skip
    assert hub.commits[0]["token"] == "hf_explicit"
    assert json.loads(sent["adapter_config.json"]) == {"peft_type": "LORA", "base_model_name_or_path": "Llama-local",
                                                       "r": 8}  # fmt: skip
    assert str(tmp_path).encode() not in b"".join(sent.values())

    # a Hub id as base is uploaded unchanged (the file as it is)
    write_adapter_folder(folder, "meta-llama/Meta-Llama-3-8B-Instruct")
    push_run_files(folder, "me/adapter")
    assert (
        hub.commits[1]["files"]["adapter_config.json"]
        == open(os.path.join(folder, "adapter_config.json"), "rb").read()
    )


@pytest.mark.parametrize("extra", ["../outside.png", "/etc/hostname", "private/missing.png", "link/plot.png"])
def test_push_run_files_refuses_files_outside_the_folder(extra, tmp_path, monkeypatch):
    from trl_midalign.scripts import push_run_files

    folder = str(tmp_path / "run")
    write_adapter_folder(folder, "org/model")
    (tmp_path / "outside.png").write_bytes(b"\x89PNG")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "plot.png").write_bytes(b"\x89PNG")
    os.symlink(tmp_path / "elsewhere", os.path.join(folder, "link"))
    hub = RecordingHub(monkeypatch)
    with pytest.raises(ValueError, match="extra file .* (must be a path relative|is not a file inside)"):
        push_run_files(folder, "me/adapter", extra_files=[extra])
    assert hub.commits == [] and hub.repos == []


def test_push_run_files_refuses_a_top_level_link_leading_outside(tmp_path, monkeypatch):
    from trl_midalign.scripts import push_run_files

    folder = str(tmp_path / "run")
    write_adapter_folder(folder, "org/model")
    (tmp_path / "private_notes.md").write_text("not for the Hub")
    os.remove(os.path.join(folder, "README.md"))
    os.symlink(tmp_path / "private_notes.md", os.path.join(folder, "README.md"))
    hub = RecordingHub(monkeypatch)
    with pytest.raises(ValueError, match=r"README\.md leads outside"):
        push_run_files(folder, "me/adapter")
    assert hub.commits == []


def test_model_card_section_holds_no_local_path(tmp_path, monkeypatch):
    from trl_midalign.tasks.report import card_section

    base = tmp_path / "models" / "Llama-3-8B-local"
    base.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    results = {"main_metric": "slot_f1", "languages": {"de-DE": {"slot_f1": 0.5, "num_examples": 2}},
               "model": str(base)}  # fmt: skip
    for base_model in (str(base), "models/Llama-3-8B-local", "./models/Llama-3-8B-local/", "~/models/x"):
        section = card_section(
            base_model, "slot_filling", ["en-US"], ["de-DE"], aligned=True, results=results,
            plots=["eval_results.png"], repo_id=None,
        )  # fmt: skip
        assert str(tmp_path) not in section
        assert "models/" not in section and "~" not in section, section
    assert "`Llama-3-8B-local` (a local copy of the base model)" in card_section(
        str(base), "slot_filling", ["en-US"], [], aligned=False
    )
    section = card_section("meta-llama/Meta-Llama-3-8B-Instruct", "slot_filling", ["en-US"], [], False, repo_id="me/x")
    assert 'AutoModelForCausalLM.from_pretrained("meta-llama/Meta-Llama-3-8B-Instruct")' in section
    assert 'PeftModel.from_pretrained(base, "me/x")' in section


@pytest.mark.parametrize("base_kind", ["local", "hub"])
def test_model_card_of_a_run_holds_no_local_path(base_kind, tmp_path, monkeypatch, tokenizer):
    """TRL's card (`trainer.create_model_card` with the recipes' arguments) and the run's section, as a recipe writes
    them: a local base model or dataset appears by its folder name or not at all, a Hub one by its id."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_midalign.scripts import model_card_arguments
    from trl_midalign.tasks.report import write_card_section

    base = tmp_path / "models" / "Llama-3-8B-local"
    model = build_model("llama", len(tokenizer))
    model.save_pretrained(base)
    data = tmp_path / "data" / "massive.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    model.config._name_or_path = "models/Llama-3-8B-local" if base_kind == "local" else "meta-llama/Meta-Llama-3-8B"
    output_dir = str(tmp_path / "run")
    args = SFTConfig(output_dir=output_dir, report_to="none", use_cpu=True, bf16=False, max_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": "Play some jazz"}] * 2),
                         processing_class=tokenizer)  # fmt: skip
    dataset = str(data) if base_kind == "local" else "org/hub-data"
    script_args = types.SimpleNamespace(dataset_name=dataset)
    trainer.create_model_card(**model_card_arguments((script_args, args, None), "slot_filling"))
    results = {"task": "slot_filling", "main_metric": "slot_f1", "languages": {"de-DE": {"slot_f1": 0.5}}}
    base_model = model.config._name_or_path
    write_card_section(output_dir, results, base_model=base_model, aligned=False, train_languages=["en-US"],
                       alignment_languages=[])  # fmt: skip
    card = (tmp_path / "run" / "README.md").read_text()
    assert str(tmp_path) not in card and "models/" not in card and "massive.jsonl" not in card
    assert "- trl-midalign" in card and "- slot_filling" in card and "plain supervised fine-tuning baseline" in card
    assert "language:\n- de\n- en\n" in card
    if base_kind == "local":
        assert "base_model:" not in card and "datasets:" not in card  # no Hub base model or dataset in the metadata
        assert "`Llama-3-8B-local` (a local copy of the base model)" in card
    else:
        assert "base_model: meta-llama/Meta-Llama-3-8B" in card and "datasets: org/hub-data" in card
        assert 'AutoModelForCausalLM.from_pretrained("meta-llama/Meta-Llama-3-8B")' in card
    # a second evaluation (--eval_only) replaces the run's section instead of adding another
    write_card_section(output_dir, results, base_model=base_model, aligned=False, train_languages=["en-US"],
                       alignment_languages=[])  # fmt: skip
    again = (tmp_path / "run" / "README.md").read_text()
    assert again == card and again.count("## slot_filling (baseline) with trl-midalign") == 1


# ----------------------------------------------------------------------------------------------------------------------
# The demo: plot, report, quiet data preparation, no deprecated settings, progress on a cold cache
def synthetic_result(num_layers: int, languages: list[str], offset: float) -> ProbeResult:
    layers = list(range(num_layers + 1))
    scores = {
        language: [min(1.0, offset + 0.02 * i + 0.01 * k) for i in layers] for k, language in enumerate(languages)
    }
    scores["mean"] = [sum(scores[lang][i] for lang in languages) / len(languages) for i in layers]
    return ProbeResult(
        layers=layers, languages=languages, retrieval_accuracy=scores, source_to_target_accuracy=scores,
        target_to_source_accuracy=scores, similarity_gap=scores, num_pairs=dict.fromkeys(languages, 128),
    )  # fmt: skip


def test_demo_plot_has_integer_layer_ticks_a_labelled_aligned_layer_and_paired_colours(tmp_path):
    from matplotlib.colors import to_rgba

    from trl_midalign.demo import DemoArguments
    from trl_midalign.demo.run import _before_after_figure, _plot

    args = DemoArguments(output_dir=str(tmp_path), train_languages=["ja", "hi", "ru"], unseen_languages=["fr", "ko"])
    languages = args.train_languages + args.unseen_languages
    before, after = synthetic_result(18, languages, 0.3), synthetic_result(18, languages, 0.4)
    figure = _before_after_figure(before, after, 12, args)
    figure.canvas.draw()
    curve, bars = figure.axes
    labels = [label.get_text() for label in curve.get_xticklabels() if label.get_text()]
    assert labels and all(label.lstrip("\u2212-").isdigit() for label in labels), labels
    assert all(float(tick).is_integer() for tick in curve.get_xticks())
    legend = [text.get_text() for text in curve.get_legend().get_texts()]
    assert "aligned layer 12" in legend
    lines = {line.get_label(): line for line in curve.get_lines()}
    assert list(lines["aligned layer 12"].get_xdata()) == [12, 12]
    for group in ("trained", "unseen"):
        first, second = lines[f"{group} languages, before"], lines[f"{group} languages, after"]
        assert to_rgba(first.get_color()) == to_rgba(second.get_color())
        assert (first.get_linestyle(), second.get_linestyle()) == ("--", "-")
    assert to_rgba(lines["trained languages, after"].get_color()) != to_rgba(
        lines["unseen languages, after"].get_color()
    )
    assert [t.get_text() for t in bars.get_xticklabels()] == ["ja", "hi", "ru", "fr*", "ko*"]
    import matplotlib.pyplot as plt

    plt.close(figure)
    path = tmp_path / "before_after.png"
    _plot(before, after, 12, args, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_report_explains_retrieval_accuracy_and_points_to_the_plot(tmp_path):
    from trl_midalign.demo import DemoArguments
    from trl_midalign.demo.run import _write_report

    args = DemoArguments(output_dir=str(tmp_path), train_languages=["ja"], unseen_languages=["fr"])
    report = _write_report(synthetic_result(6, ["ja", "fr"], 0.3), synthetic_result(6, ["ja", "fr"], 0.5), 3, args)
    assert "nearest English sentence, by cosine similarity of the layer's mean-pooled hidden states" in report
    assert "chance is 1/128 = 0.008" in report and "`before_after.png`" in report
    assert (
        "| ja | yes | 0.360 | 0.560 | +0.200 |" in report
        and "| fr | no (unseen) | 0.370 | 0.570 | +0.200 |" in report
        and "| **mean unseen** | | 0.370 | 0.570 | +0.200 |" in report
    )
    # no unseen languages: no mean row for them (and no division by zero)
    args = DemoArguments(output_dir=str(tmp_path), train_languages=["ja"], unseen_languages=[])
    report = _write_report(synthetic_result(6, ["ja"], 0.3), synthetic_result(6, ["ja"], 0.5), 3, args)
    assert "**mean trained**" in report and "**mean unseen**" not in report


def test_demo_settings_raise_no_deprecation_warning(tmp_path):
    from trl_midalign.demo import DemoArguments
    from trl_midalign.demo.run import _alignment_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = _alignment_config(DemoArguments(output_dir=str(tmp_path)))
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert config.activation_checkpointing is False and config.gradient_checkpointing is False


def test_demo_trainer_is_built_without_future_warnings(tmp_path, tokenizer):
    from datasets import Dataset

    from trl_midalign.demo import DemoArguments
    from trl_midalign.demo.run import _alignment_trainer

    pairs = Dataset.from_list(pair_rows() * 1)
    args = DemoArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, max_length=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _alignment_trainer(build_model("gemma3", len(tokenizer)), tokenizer, pairs, args)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert trainer.args.activation_checkpointing is False and 1 <= trainer.align_layer <= 4
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
        _ = trainer.model.get_base_model().is_gradient_checkpointing  # outside the demo it still warns


def test_demo_data_preparation_shows_no_progress_bars_and_restores_them(capsys):
    import datasets

    from trl_midalign.demo.run import _datasets_progress_bars_disabled, _split_pairs

    rows = [{"language": lang, "parallel_source": f"{lang} {i}", "parallel_target": f"en {i}", "id": str(i)}
            for lang in ("ja", "fr") for i in range(6)]  # fmt: skip
    pairs = datasets.Dataset.from_list(rows)
    enabled = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    try:
        pairs.filter(lambda row: True)
        assert "Filter" in capsys.readouterr().err  # the bars this guards against
        with _datasets_progress_bars_disabled():
            train, held_out = _split_pairs(pairs, ["ja", "fr"], eval_n=2, train_n=3)
            pairs.filter(lambda row: True)
        assert "Filter" not in capsys.readouterr().err
        assert datasets.is_progress_bar_enabled()
    finally:
        if not enabled:
            datasets.disable_progress_bars()
    assert held_out["parallel_source"] == ["ja 0", "ja 1", "fr 0", "fr 1"]
    assert train["parallel_source"] == ["ja 2", "ja 3", "ja 4", "fr 2", "fr 3", "fr 4"]


def fake_deb(path, help_dir: str, pages: dict[str, list[tuple[str, str]]]) -> None:
    """A minimal Debian package (an `ar` archive with `data.tar.xz`) holding LibreOffice help pages."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as archive:
        for page, paragraphs in pages.items():
            html = "<html><body>" + "".join(f'<p id="{i}">{text}</p>' for i, text in paragraphs) + "</body></html>"
            content = html.encode("utf-8")
            info = tarfile.TarInfo(f"./usr/share/libreoffice/help/{help_dir}/text/{page}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    members = [("debian-binary", b"2.0\n"), ("data.tar.xz", tar_bytes.getvalue())]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, content in members:
            header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode("ascii")
            f.write(header + content + (b"\n" if len(content) % 2 else b""))


ENGLISH = [("par_id1", "Click the button to save the document."), ("par_id2", "Choose a color for the chart.")]
JAPANESE = [("par_id1", "ボタンをクリックしてドキュメントを保存します。"), ("par_id2", "グラフの色を選択します。")]


def test_demo_shows_progress_while_extracting_the_help_pages(tmp_path, capsys):
    from trl_midalign.demo import libreoffice_parallel_pairs
    from trl_midalign.demo.run import _show_progress

    debs = tmp_path / "cache" / "libreoffice_help" / "debs"
    debs.mkdir(parents=True)
    fake_deb(debs / "libreoffice-help-en-us_1.0_all.deb", "en-US", {"shared/page.html": ENGLISH})
    fake_deb(debs / "libreoffice-help-ja_1.0_all.deb", "ja", {"shared/page.html": JAPANESE})
    shown = [logging.getLogger(name) for name in ("trl_midalign.demo",)]
    before = [(logger.level, list(logger.handlers)) for logger in shown]
    with _show_progress():
        pairs = libreoffice_parallel_pairs(["ja"], cache_dir=tmp_path / "cache")
    printed = capsys.readouterr().out
    assert "[demo] Extracting the en-US help paragraphs from libreoffice-help-en-us_1.0_all.deb" in printed
    assert "[demo] Extracting the ja help paragraphs" in printed and "[demo] Extracted 2 ja paragraphs" in printed
    assert sorted(zip(pairs["parallel_source"], pairs["parallel_target"])) == sorted(
        (ja, en) for (_, ja), (_, en) in zip(JAPANESE, ENGLISH)
    )
    assert [(logger.level, logger.handlers) for logger in shown] == before  # restored
    # cached now: a second call is silent
    with _show_progress():
        libreoffice_parallel_pairs(["ja"], cache_dir=tmp_path / "cache")
    assert "[demo]" not in capsys.readouterr().out


def test_demo_without_apt_get_says_what_to_do(tmp_path, capsys, monkeypatch):
    from trl_midalign.demo import libreoffice
    from trl_midalign.demo.run import _show_progress

    monkeypatch.setattr(libreoffice.shutil, "which", lambda name: None)
    with _show_progress(), pytest.raises(RuntimeError, match=r"needs Debian's `apt-get`.*libreoffice_help/debs"):
        libreoffice.libreoffice_parallel_pairs(["ja"], cache_dir=tmp_path / "cache")
    assert "[demo] Downloading libreoffice-help-en-us (a few MB) with `apt-get download`" in capsys.readouterr().out


def test_demo_shows_progress_while_converting_the_model(tmp_path, capsys, monkeypatch):
    import trl_midalign.modeling as modeling
    from trl_midalign.demo import gemma
    from trl_midalign.demo.run import _show_progress

    tokenizer = build_tokenizer()
    monkeypatch.setattr(gemma, "_gemma_package", lambda: None)
    monkeypatch.setattr(gemma, "gemma3_270m_gguf", lambda cache_dir=None: "gemma.gguf")
    monkeypatch.setattr(modeling, "load_causal_lm", lambda path, dtype=None: build_model("gemma3", len(tokenizer)))
    monkeypatch.setattr(modeling, "load_tokenizer", lambda path: tokenizer)
    with _show_progress():
        path = gemma.gemma3_270m(tmp_path / "cache")
    printed = capsys.readouterr().out
    assert "[demo] Converting Gemma 3 270M to a float32 transformers checkpoint" in printed
    assert f"[demo] Saving the float32 checkpoint (about 1.1 GB) to {path} ..." in printed
    assert f"[demo] Gemma 3 270M is ready in {path}" in printed
    assert os.path.isfile(os.path.join(path, "config.json"))
    with _show_progress():
        assert gemma.gemma3_270m(tmp_path / "cache") == path
    assert capsys.readouterr().out == ""  # cached: nothing to report


def test_demo_refuses_an_empty_training_language_list(tmp_path):
    from trl_midalign.demo import DemoArguments
    from trl_midalign.demo.run import run_demo

    with pytest.raises(ValueError, match="--train_languages is empty"):
        run_demo(DemoArguments(output_dir=str(tmp_path), train_languages=[], unseen_languages=["fr"]))
