import json
import os
import sys

import pytest
import torch
from datasets import Dataset
from testing_utils import PAIRS, TASKS, build_model, task_rows, write_jsonl
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from trl_midalign import AlignmentConfig, AlignmentTrainer
from trl_midalign.cli import main as cli_main
from trl_midalign.losses import pool
from trl_midalign.probing import LayerProbeCallback, ProbeResult, probe_layers, recommend_layer


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def language_pairs() -> list[dict]:
    """The toy pairs of conftest: the first six are German, the last six French."""
    return [
        {"language": "de" if i < 6 else "fr", "parallel_source": source, "parallel_target": target}
        for i, (source, target) in enumerate(PAIRS)
    ]


def plain_probe(model, tokenizer, pairs: list[dict]) -> dict:
    """
    Reference: each sentence alone through the full causal LM (no batching, no padding), its hidden states averaged
    over all tokens, then explicit cosines and argmax retrieval in Python.
    """
    model.eval()
    embeddings = {}
    with torch.no_grad():
        for row in pairs:
            for sentence in (row["parallel_source"], row["parallel_target"]):
                ids = torch.tensor([tokenizer(sentence)["input_ids"]])
                states = model(input_ids=ids, output_hidden_states=True).hidden_states
                embeddings[sentence] = [layer[0].double().mean(dim=0) for layer in states]
    num_layers = len(next(iter(embeddings.values())))

    def cos(a, b):
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    out = {"s2t": {}, "t2s": {}, "gap": {}}
    for language in dict.fromkeys(row["language"] for row in pairs):
        rows = [row for row in pairs if row["language"] == language]
        n = len(rows)
        for key in out:
            out[key][language] = []
        for layer in range(num_layers):
            src = [embeddings[row["parallel_source"]][layer] for row in rows]
            tgt = [embeddings[row["parallel_target"]][layer] for row in rows]
            sim = [[cos(src[i], tgt[j]) for j in range(n)] for i in range(n)]
            s2t = sum(max(range(n), key=lambda j, i=i: sim[i][j]) == i for i in range(n)) / n
            t2s = sum(max(range(n), key=lambda j, i=i: sim[j][i]) == i for i in range(n)) / n
            true_pairs = sum(sim[i][i] for i in range(n)) / n
            non_pairs = sum(sim[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            out["s2t"][language].append(s2t)
            out["t2s"][language].append(t2s)
            out["gap"][language].append(true_pairs - non_pairs)
    return out


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_probe_matches_plain_computation(kind, tokenizer):
    model = build_model(kind, len(tokenizer), num_layers=4, seed=3)
    pairs = language_pairs()
    # batch_size=5 mixes sources and targets of different lengths in right-padded batches
    result = probe_layers(model, tokenizer, Dataset.from_list(pairs), batch_size=5)
    expected = plain_probe(model, tokenizer, pairs)

    assert result.layers == [0, 1, 2, 3, 4]
    assert result.languages == ["de", "fr"]
    assert result.num_pairs == {"de": 6, "fr": 6}
    for language in ("de", "fr"):
        assert result.source_to_target_accuracy[language] == expected["s2t"][language]
        assert result.target_to_source_accuracy[language] == expected["t2s"][language]
        both = [(a + b) / 2 for a, b in zip(expected["s2t"][language], expected["t2s"][language])]
        assert result.retrieval_accuracy[language] == pytest.approx(both)
        assert result.similarity_gap[language] == pytest.approx(expected["gap"][language], abs=1e-5)
    for scores in (result.retrieval_accuracy, result.similarity_gap):
        assert scores["mean"] == pytest.approx([(d + f) / 2 for d, f in zip(scores["de"], scores["fr"])])
    assert result.recommended_layer == recommend_layer(result.retrieval_accuracy["mean"])
    # The scores must not all be trivially equal, or the comparison above would prove little.
    assert len({round(v, 6) for v in result.similarity_gap["mean"]}) > 1


@pytest.mark.parametrize("pooling", ["last", "mean_no_special"])
def test_probe_pools_as_the_alignment_loss(pooling, tokenizer):
    """`pooling=` is the trainer's pooling: each sentence alone through the model, pooled by hand, same scores."""
    model = build_model("llama", len(tokenizer), num_layers=3, seed=5).eval()
    pairs = language_pairs()[:6]
    special = set(tokenizer.all_special_ids)
    embeddings = {}
    with torch.no_grad():
        for row in pairs:
            for sentence in (row["parallel_source"], row["parallel_target"]):
                ids = tokenizer(sentence)["input_ids"]
                states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
                keep = [i for i, token in enumerate(ids) if token not in special]
                assert 0 < len(keep) < len(ids)  # the BOS token is left out, and only it
                embeddings[sentence] = [
                    layer[0, -1] if pooling == "last" else layer[0, keep].mean(dim=0) for layer in states
                ]
    result = probe_layers(model, tokenizer, pairs, batch_size=5, pooling=pooling)
    assert result.pooling == pooling
    for layer in result.layers:
        source = torch.stack([embeddings[row["parallel_source"]][layer] for row in pairs])
        target = torch.stack([embeddings[row["parallel_target"]][layer] for row in pairs])
        similarity = torch.nn.functional.cosine_similarity(source[:, None], target[None], dim=-1)  # (n, n)
        hits = (similarity.argmax(dim=1) == torch.arange(6)).double().mean() + (
            similarity.argmax(dim=0) == torch.arange(6)
        ).double().mean()
        assert result.retrieval_accuracy["de"][layer] == pytest.approx(hits.item() / 2)
        gap = similarity.diagonal().mean() - (similarity.sum() - similarity.diagonal().sum()) / 30
        assert result.similarity_gap["de"][layer] == pytest.approx(gap.item(), abs=1e-5)
    mean_pooled = probe_layers(model, tokenizer, pairs, batch_size=5)
    assert mean_pooled.similarity_gap["de"] != pytest.approx(result.similarity_gap["de"])  # the pooling matters
    # and it is what losses.pool computes on the same states
    ids = tokenizer([pairs[0]["parallel_source"]], return_tensors="pt")
    with torch.no_grad():
        states = model(**ids, output_hidden_states=True).hidden_states[2]
    mask = torch.tensor([[token in special for token in ids["input_ids"][0].tolist()]])
    torch.testing.assert_close(
        pool(states, ids["attention_mask"], pooling, mask)[0], embeddings[pairs[0]["parallel_source"]][2]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_sides_are_retrieved_at_every_layer(dtype, tokenizer):
    """Known by construction: when each target is its source, every layer retrieves every pair."""
    model = build_model("gemma3", len(tokenizer), num_layers=3).to(dtype)
    pairs = [{"language": "xx", "parallel_source": s, "parallel_target": s} for s, _ in PAIRS]
    result = probe_layers(model, tokenizer, pairs, batch_size=4)
    assert result.retrieval_accuracy["xx"] == [1.0] * 4
    assert result.source_to_target_accuracy["mean"] == [1.0] * 4
    assert all(0 < gap < 1 for gap in result.similarity_gap["xx"])
    # every layer ties at 1.0: the scores cannot tell the layers apart, so no layer is recommended
    assert result.recommended_layer is None


def test_swapped_translations_are_never_retrieved(tokenizer):
    """Known by construction: when each source is paired with another pair's (identical) sentence, nothing is found."""
    model = build_model("llama", len(tokenizer), num_layers=2)
    sentences = [s for s, _ in PAIRS[:6]]
    shifted = sentences[1:] + sentences[:1]
    pairs = [{"language": "xx", "parallel_source": s, "parallel_target": t} for s, t in zip(sentences, shifted)]
    result = probe_layers(model, tokenizer, pairs)
    assert result.retrieval_accuracy["xx"] == [0.0] * 3
    assert all(gap < 0 for gap in result.similarity_gap["xx"])


def test_recommend_layer_skips_embeddings_and_prefers_lower_layer_on_ties():
    assert recommend_layer([0.9, 0.2, 0.5, 0.5, 0.1]) == 2
    assert recommend_layer([0.1, 0.3], layers=[0, 7]) == 7
    # scores that cannot tell the layers apart recommend nothing: all zero, or all equal
    assert recommend_layer([0.5, 0.0, 0.0]) is None
    assert recommend_layer([0.0, 0.0], layers=[0, 7]) is None
    assert recommend_layer([0.9, 0.4, 0.4, 0.4]) is None
    with pytest.raises(ValueError, match="no layer above 0"):
        recommend_layer([0.5])


def test_probe_restores_training_mode_and_leaves_no_gradients(tokenizer):
    model = build_model("llama", len(tokenizer), num_layers=2)
    model.train()
    model.model.layers[0].eval()  # a submodule deliberately in eval mode must stay so
    probe_layers(model, tokenizer, language_pairs())
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    probe_layers(model, tokenizer, language_pairs())
    assert not any(m.training for m in model.modules())


def test_probe_bad_input(tokenizer):
    model = build_model("llama", len(tokenizer), num_layers=2)
    pairs = language_pairs()
    with pytest.raises(ValueError, match=r"Unknown language\(s\) \['ja'\].*\['de', 'fr'\]"):
        probe_layers(model, tokenizer, pairs, languages=["de", "ja"])
    with pytest.raises(ValueError, match="no column 'src'.*source_column"):
        probe_layers(model, tokenizer, Dataset.from_list(pairs), source_column="src")
    with pytest.raises(ValueError, match="no column 'tgt'.*target_column"):
        probe_layers(model, tokenizer, pairs, target_column="tgt")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        probe_layers(model, tokenizer, pairs, max_pairs_per_language=1)
    with pytest.raises(ValueError, match="pooling='max' is not supported"):
        probe_layers(model, tokenizer, pairs, pooling="max")

    # A bad pair is an error naming the row and the column (the one policy, trl_midalign.data.check_pairs), not dropped
    blank = [*pairs[:3], dict(pairs[3], parallel_source="  "), *pairs[4:]]
    with pytest.raises(ValueError, match=r"Row 3 of the pairs: column 'parallel_source' holds an empty"):
        probe_layers(model, tokenizer, blank)
    missing = Dataset.from_list([pairs[0], dict(pairs[1], parallel_target=None), *pairs[2:]])
    with pytest.raises(ValueError, match=r"Row 1 of the pairs: column 'parallel_target' holds None"):
        probe_layers(model, tokenizer, missing)

    lonely = [{"language": "ja", "parallel_source": "テスト", "parallel_target": "Test"}]
    with pytest.warns(UserWarning, match=r"fewer than 2 pairs.*ja \(1\)"):
        result = probe_layers(model, tokenizer, pairs + lonely)
    assert result.languages == ["de", "fr"]
    assert result.num_pairs == {"de": 6, "fr": 6}

    with pytest.raises(ValueError, match="No language has at least 2 usable pairs"), pytest.warns(UserWarning):
        probe_layers(model, tokenizer, lonely)


def test_pairs_without_language_column_form_one_group(tokenizer, pair_dataset):
    model = build_model("llama", len(tokenizer), num_layers=2)
    result = probe_layers(model, tokenizer, pair_dataset, max_pairs_per_language=5)
    assert result.languages == ["all"]
    assert result.num_pairs == {"all": 5}
    with pytest.raises(ValueError, match="no 'language' column.*language_column"):
        probe_layers(model, tokenizer, pair_dataset, languages=["de"])


def test_repeated_sentences_are_dropped_with_a_warning(tokenizer):
    model = build_model("llama", len(tokenizer), num_layers=2)
    pairs = language_pairs()
    repeated = [dict(pairs[0], parallel_target="Something else"), dict(pairs[1], parallel_source="Anders")]
    with pytest.warns(UserWarning, match="Dropped 2 pair\\(s\\) that repeat"):
        result = probe_layers(model, tokenizer, pairs + repeated)
    assert result.num_pairs == {"de": 6, "fr": 6}
    assert result == probe_layers(model, tokenizer, pairs)


def test_result_json_round_trip_table_and_plots(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer), num_layers=3)
    result = probe_layers(model, tokenizer, language_pairs())
    path = result.to_json(tmp_path / "probe.json")
    with open(path) as f:
        data = json.load(f)
    assert data["layers"] == [0, 1, 2, 3]
    assert data["languages"] == ["de", "fr"]
    assert set(data["retrieval_accuracy"]) == {"de", "fr", "mean"}
    assert all(len(v) == 4 for v in data["retrieval_accuracy"].values())
    assert data["recommended_layer"] == result.recommended_layer
    assert data["num_pairs"] == {"de": 6, "fr": 6}
    assert "model_name" in data and data["pooling"] == "mean"
    assert ProbeResult.from_json(path) == result

    table = result.to_markdown()
    lines = table.splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].startswith("| layer | de (n=6) | fr (n=6) | mean")
    assert lines[2 + result.recommended_layer].startswith(f"| {result.recommended_layer}* |")
    assert f"{result.retrieval_accuracy['fr'][2]:.3f}" in lines[4]

    written = result.plot(tmp_path / "plots")
    assert [os.path.basename(p) for p in written] == ["probe_heatmap.png", "probe_curve.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_plot_without_matplotlib_says_how_to_install(tmp_path, tokenizer, monkeypatch):
    model = build_model("llama", len(tokenizer), num_layers=1)
    result = probe_layers(model, tokenizer, language_pairs())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"trl-midalign\[plot\]"):
        result.plot(tmp_path)


def test_cli_probe_end_to_end(tmp_path, tiny_model_dir, tokenizer, capsys):
    rows = [dict(row, lang=row.pop("language")) for row in language_pairs()]  # custom language column name
    rows.append({"lang": "it", "parallel_source": "Ciao", "parallel_target": "Hello"})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "probe-out"
    argv = ["probe", "--model_name_or_path", tiny_model_dir, "--data", data, "--output_dir", str(out)]
    cli_main([*argv, "--languages", "fr", "de", "--language_column", "lang", "--batch_size", "4"])

    for name in ("probe.json", "probe_heatmap.png", "probe_curve.png"):
        assert (out / name).is_file()
    data_json = json.loads((out / "probe.json").read_text())
    assert data_json["layers"] == [0, 1, 2, 3, 4]
    assert data_json["languages"] == ["fr", "de"]
    assert set(data_json["retrieval_accuracy"]) == {"fr", "de", "mean"}
    assert data_json["num_pairs"] == {"fr": 6, "de": 6}
    assert data_json["model_name"] == tiny_model_dir

    # the CLI's numbers are those of the library function on the same model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    direct = probe_layers(model, tokenizer, language_pairs(), languages=["fr", "de"])
    assert set(data_json["retrieval_accuracy"]) == set(direct.retrieval_accuracy)
    for key, scores in direct.retrieval_accuracy.items():  # pytest>=9.2 refuses nested containers in approx
        assert data_json["retrieval_accuracy"][key] == pytest.approx(scores), key
    assert data_json["recommended_layer"] == direct.recommended_layer

    printed = capsys.readouterr().out
    assert "| layer | fr (n=6) | de (n=6) | mean |" in printed
    assert f"Recommended layer: {direct.recommended_layer} of 4" in printed

    last = tmp_path / "probe-last"
    cli_main(["probe", "--model_name_or_path", tiny_model_dir, "--data", data, "--output_dir", str(last), "--no_plot",
              "--language_column", "lang", "--languages", "de", "fr", "--pooling", "last"])  # fmt: skip
    result = ProbeResult.from_json(last / "probe.json")
    assert result.pooling == "last"
    direct_last = probe_layers(model, tokenizer, language_pairs(), pooling="last")
    for key, scores in direct_last.similarity_gap.items():
        assert result.similarity_gap[key] == pytest.approx(scores, abs=1e-5), key
    assert "Retrieval accuracy of last-pooled states" in capsys.readouterr().out


def test_cli_probe_bad_paths(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", language_pairs())
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli_main(["probe", "--model_name_or_path", str(tmp_path / "missing"), "--data", data, "--output_dir", out])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli_main(
            ["probe", "--model_name_or_path", str(tmp_path / "missing.gguf"), "--data", data, "--output_dir", out]
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        missing_data = str(tmp_path / "nope.jsonl")
        cli_main(["probe", "--model_name_or_path", tiny_model_dir, "--data", missing_data, "--output_dir", out])
    with pytest.raises(ValueError, match=r"Unknown language.*\['de', 'fr'\]"):
        cli_main(
            ["probe", "--model_name_or_path", tiny_model_dir, "--data", data, "--output_dir", out, "--languages", "ko"]
        )
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------------------------------
# LayerProbeCallback
# ---------------------------------------------------------------------------------------------------------------------


class RecordLogs(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): records what `on_log` receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def train_rows(n: int = 16) -> list[dict]:
    return [{"text": f"{prompt} -> {completion}"} for prompt, completion in (TASKS * 4)[:n]]


def lm_dataset(tokenizer, n: int = 16) -> Dataset:
    rows = []
    for row in train_rows(n):
        ids = tokenizer(row["text"], truncation=True, max_length=16, padding="max_length")["input_ids"]
        rows.append({"input_ids": ids, "labels": ids})
    return Dataset.from_list(rows)


def assert_regular_lines_kept(log_history, logging_steps, max_steps):
    train_lines = {entry["step"]: entry for entry in log_history if "loss" in entry}
    assert sorted(train_lines) == list(range(logging_steps, max_steps + 1, logging_steps))
    for entry in train_lines.values():
        assert {"loss", "learning_rate", "grad_norm"} <= set(entry)


def test_callback_every_n_steps_with_sft_trainer(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer), num_layers=3)
    recorder = RecordLogs()
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=4, logging_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", max_length=32, disable_tqdm=True, bf16=False,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows()),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    trainer.align_layer = 2  # as AlignmentTrainer sets it
    callback = LayerProbeCallback(language_pairs(), every_n_steps=2, trainer=trainer)
    trainer.add_callback(callback)  # after the recorder, as user callbacks come after the reporting integrations
    trainer.train()

    assert_regular_lines_kept(trainer.state.log_history, logging_steps=2, max_steps=4)
    expected_keys = {f"probe/retrieval_layer_{layer}" for layer in range(4)} | {
        "probe/retrieval_de",
        "probe/retrieval_fr",
    }
    probe_steps = [step for step, result in callback.history]
    assert probe_steps == [2, 4]
    for step, result in callback.history:
        # merged into the regular training line of the same step, in the history and in what integrations receive
        (line,) = [e for e in trainer.state.log_history if e["step"] == step and "loss" in e]
        (reported,) = [logs for s, logs in recorder.logs if s == step and "loss" in logs]
        for logs in (line, reported):
            assert expected_keys <= set(logs)
            assert logs["probe/retrieval_layer_1"] == pytest.approx(result.retrieval_accuracy["mean"][1])
            assert logs["probe/retrieval_fr"] == pytest.approx(result.retrieval_accuracy["fr"][2])
    # the last logged values describe the final model
    final = probe_layers(model, tokenizer, language_pairs())
    last = [e for e in trainer.state.log_history if e["step"] == 4 and "loss" in e][0]
    assert last["probe/retrieval_de"] == pytest.approx(final.retrieval_accuracy["de"][2])
    assert callback.history[0][1] != callback.history[1][1]  # training changed the model between the probes
    for step in (2, 4):
        directory = tmp_path / "layer_probe" / f"step-{step}"
        assert ProbeResult.from_json(directory / "probe.json").layers == [0, 1, 2, 3]
        assert (directory / "probe_heatmap.png").is_file() and (directory / "probe_curve.png").is_file()


@pytest.mark.parametrize("trainer_cls", [Trainer, SFTTrainer])
def test_callback_at_evaluation(trainer_cls, tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer), num_layers=2)
    settings = dict(
        output_dir=str(tmp_path), max_steps=4, logging_steps=1, eval_strategy="steps", eval_steps=2,
        per_device_train_batch_size=4, report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    if trainer_cls is SFTTrainer:
        args, train, dev = SFTConfig(**settings, bf16=False), train_rows(), train_rows(4)
        train, dev = Dataset.from_list(train), Dataset.from_list(dev)
    else:
        args, train, dev = TrainingArguments(**settings), lm_dataset(tokenizer), lm_dataset(tokenizer, 4)
    recorder = RecordLogs()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer, callbacks=[recorder]
    )
    callback = LayerProbeCallback(language_pairs(), layers=[1, 2], save_plots=False)
    callback.set_trainer(trainer)
    trainer.add_callback(callback)
    trainer.train()

    history = trainer.state.log_history
    assert_regular_lines_kept(history, logging_steps=1, max_steps=4)
    assert sorted(e["step"] for e in history if "eval_loss" in e) == [2, 4]
    probe_lines = [e for e in history if any(key.startswith("probe/") for key in e)]
    assert [e["step"] for e in probe_lines] == [2, 4]
    for entry, (step, result) in zip(probe_lines, callback.history):
        assert entry["step"] == step
        assert {k for k in entry if k.startswith("probe/")} == {
            "probe/retrieval_layer_1",
            "probe/retrieval_layer_2",
            "probe/runtime",
        }
        assert 0 < entry["probe/runtime"] < 60
        assert entry["probe/retrieval_layer_2"] == pytest.approx(result.retrieval_accuracy["mean"][2])
    assert sum("probe/retrieval_layer_1" in logs for _, logs in recorder.logs) == 2
    assert (tmp_path / "layer_probe" / "step-4" / "probe.json").is_file()
    assert not (tmp_path / "layer_probe" / "step-4" / "probe_heatmap.png").exists()


def test_callback_every_n_steps_with_plain_trainer_keeps_log_lines(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer), num_layers=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, logging_steps=1, per_device_train_batch_size=4,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), processing_class=tokenizer)
    callback = LayerProbeCallback(language_pairs(), every_n_steps=1, trainer=trainer, save_plots=False)
    trainer.add_callback(callback)
    trainer.train()
    assert_regular_lines_kept(trainer.state.log_history, logging_steps=1, max_steps=3)
    assert [e["step"] for e in trainer.state.log_history if "probe/retrieval_layer_0" in e] == [1, 2, 3]


def test_callback_scores_between_log_lines_go_to_the_next_line(tmp_path, tokenizer):
    """Probed at steps 3 and 6, logging every 4 steps: the first scores join step 4's training line, the last ones
    the summary line at the end of training; none is lost and no regular line is dropped."""
    model = build_model("llama", len(tokenizer), num_layers=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, logging_steps=4, per_device_train_batch_size=4,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), processing_class=tokenizer)
    callback = LayerProbeCallback(language_pairs(), every_n_steps=3, trainer=trainer, save_plots=False)
    trainer.add_callback(callback)
    trainer.train()
    history = trainer.state.log_history
    assert_regular_lines_kept(history, logging_steps=4, max_steps=6)
    assert [step for step, _ in callback.history] == [3, 6]
    lines = [entry for entry in history if "probe/retrieval_layer_1" in entry]
    assert [entry["step"] for entry in lines] == [4, 6]
    assert "loss" in lines[0] and "train_runtime" in lines[1]
    for entry, (_, result) in zip(lines, callback.history):
        assert entry["probe/retrieval_layer_1"] == pytest.approx(result.retrieval_accuracy["mean"][1])


def test_naive_logging_from_on_step_end_drops_lines(tmp_path, tokenizer):
    """Control for the tests above: calling `trainer.log` in `on_step_end` does drop the regular line."""
    model = build_model("llama", len(tokenizer), num_layers=1)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, logging_steps=1, per_device_train_batch_size=4,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), processing_class=tokenizer)

    class NaiveLogger(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trainer.log({"naive": 1.0})

    trainer.add_callback(NaiveLogger())
    trainer.train()
    assert not any("loss" in e and "train_runtime" not in e for e in trainer.state.log_history)


def test_callback_needs_a_trainer_and_valid_layers(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer), num_layers=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), processing_class=tokenizer)
    trainer.add_callback(LayerProbeCallback(language_pairs(), every_n_steps=1, save_plots=False))
    with pytest.raises(ValueError, match="set_trainer"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused before the first step

    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), processing_class=tokenizer)
    trainer.add_callback(LayerProbeCallback(language_pairs(), every_n_steps=1, layers=[5], trainer=trainer))
    with pytest.raises(ValueError, match=r"\[5\] are outside the model.*0\.\.2"):
        trainer.train()
    with pytest.raises(ValueError, match="every_n_steps"):
        LayerProbeCallback(language_pairs(), every_n_steps=0)


# ---------------------------------------------------------------------------------------------------------------------
# Real model, real parallel text
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.downloads
def test_gemma3_270m_on_libreoffice_pairs_peaks_in_the_middle(tmp_path, capsys):
    """The paper's finding on a real multilingual model: alignment peaks in the middle layers, not at the top."""
    from trl_midalign.demo import gemma3_270m, libreoffice_parallel_pairs

    pairs = libreoffice_parallel_pairs(["de", "fr", "ja"], max_pairs_per_language=64, seed=0)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs.to_list())
    out = tmp_path / "gemma"
    cli_main(["probe", "--model_name_or_path", gemma3_270m(), "--data", data, "--output_dir", str(out)])

    result = ProbeResult.from_json(out / "probe.json")
    num_layers = 18
    assert result.layers == list(range(num_layers + 1))
    assert result.languages == ["de", "fr", "ja"]
    assert result.num_pairs == {"de": 64, "fr": 64, "ja": 64}
    for scores in (result.retrieval_accuracy, result.similarity_gap, result.source_to_target_accuracy):
        assert set(scores) == {"de", "fr", "ja", "mean"}
        assert all(len(values) == num_layers + 1 for values in scores.values())

    mean = result.retrieval_accuracy["mean"]
    peak = result.recommended_layer
    assert mean[peak] == max(mean[1:])
    assert 0.4 * num_layers <= peak <= 0.8 * num_layers, mean
    assert mean[peak] >= 0.4, mean
    assert mean[num_layers] <= 0.2, mean
    for name in ("probe_heatmap.png", "probe_curve.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert f"Recommended layer: {peak} of {num_layers}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.downloads
def test_cli_probe_accepts_a_gguf_file(tmp_path):
    """A `.gguf` path is dequantized on load and probes exactly like the checkpoint converted from it."""
    from trl_midalign.demo import gemma3_270m, gemma3_270m_gguf, libreoffice_parallel_pairs

    pairs = libreoffice_parallel_pairs(["de", "ja"], max_pairs_per_language=8, seed=1)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs.to_list())
    results = []
    for name, model in (("gguf", gemma3_270m_gguf()), ("converted", gemma3_270m())):
        out = tmp_path / name
        cli_main(["probe", "--model_name_or_path", model, "--data", data, "--output_dir", str(out), "--no_plot"])
        results.append(ProbeResult.from_json(out / "probe.json"))
        assert not (out / "probe_heatmap.png").exists()
    from_gguf, from_checkpoint = results
    assert from_gguf.model_name.endswith(".gguf")
    assert from_gguf.layers == list(range(19))
    assert from_gguf.retrieval_accuracy == from_checkpoint.retrieval_accuracy
    assert set(from_gguf.similarity_gap) == set(from_checkpoint.similarity_gap)
    for key, gaps in from_checkpoint.similarity_gap.items():  # pytest>=9.2 refuses nested containers in approx
        assert from_gguf.similarity_gap[key] == pytest.approx(gaps, abs=1e-6), key


def test_callback_with_alignment_trainer_wires_itself_and_keeps_log_lines(tmp_path, tokenizer):
    callback = LayerProbeCallback(language_pairs(), every_n_steps=2)  # no trainer given: AlignmentTrainer wires it
    args = AlignmentConfig(
        output_dir=str(tmp_path), max_steps=4, logging_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, use_cpu=True, align_pooling="last",
    )  # fmt: skip
    trainer = AlignmentTrainer(
        model=build_model("llama", len(tokenizer), num_layers=4),
        args=args,
        train_dataset=Dataset.from_list(task_rows(n=8)),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    assert callback.trainer is trainer
    trainer.train()
    assert_regular_lines_kept(trainer.state.log_history, logging_steps=2, max_steps=4)
    for step in (2, 4):
        (line,) = [e for e in trainer.state.log_history if e["step"] == step and "loss" in e]
        assert {"probe/retrieval_de", "probe/retrieval_fr", "probe/retrieval_layer_2"} <= set(line)
        assert {"task_loss", "align_loss"} <= set(line)
    assert [result.pooling for _, result in callback.history] == ["last", "last"]  # probes what the loss trains
