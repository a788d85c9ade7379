"""Tests of the task library (trl_midalign.tasks): metrics against independent computations, answer formats, generation,
reports, plots, the model card's section and the loading of task data and pairs."""

import json
import random
import types

import pytest
import sacrebleu
import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from testing_utils import build_model

from trl_midalign.tasks.arguments import RecipeArguments
from trl_midalign.tasks.metrics import exact_match, span_f1
from trl_midalign.tasks.report import (
    evaluate_examples,
    generate_completions,
    load_results,
    plot_results,
    reference_losses,
    results_table,
    summarize_groups,
    write_results,
)
from trl_midalign.tasks.slot_filling import format_slots, parse_slots, slot_scores
from trl_midalign.tasks.structured_generation import entity_scores, format_entities, parse_entities
from trl_midalign.tasks.translation import translation_scores


def _spans_from_bio(tokens, tags):
    """(type, text) spans of a BIO sequence, read independently of the code under test (strict B-I chains)."""
    spans, i = [], 0
    while i < len(tags):
        if tags[i].startswith("B-"):
            kind, j = tags[i][2:], i + 1
            while j < len(tags) and tags[j] == f"I-{kind}":
                j += 1
            spans.append((kind, " ".join(tokens[i:j])))
            i = j
        else:
            i += 1
    return spans


def _random_bio(rng, length, types=("time", "date", "place")):
    tags, i = [], 0
    while i < length:
        if rng.random() < 0.35:
            kind, span = rng.choice(types), rng.randint(1, 3)
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (span - 1)
            i += span
        else:
            tags.append("O")
            i += 1
    return tags[:length]


def test_span_f1_matches_seqeval_on_random_bio_sequences():
    # Unique tokens per position make a span's text identify its offsets, so text-level matching must equal
    # seqeval's offset-level matching exactly.
    rng = random.Random(0)
    gold_tags, pred_tags, gold_spans, pred_spans = [], [], [], []
    for sentence in range(200):
        length = rng.randint(1, 12)
        tokens = [f"w{sentence}_{k}" for k in range(length)]
        gold = _random_bio(rng, length)
        pred = list(gold) if rng.random() < 0.3 else _random_bio(rng, length)
        gold_tags.append(gold)
        pred_tags.append(pred)
        gold_spans.append(_spans_from_bio(tokens, gold))
        pred_spans.append(_spans_from_bio(tokens, pred))
    scores = span_f1(pred_spans, gold_spans)
    assert scores["precision"] == pytest.approx(precision_score(gold_tags, pred_tags))
    assert scores["recall"] == pytest.approx(recall_score(gold_tags, pred_tags))
    assert scores["f1"] == pytest.approx(f1_score(gold_tags, pred_tags))
    assert 0.2 < scores["f1"] < 0.9  # a non-trivial mix of hits and misses


def test_span_f1_counts_multisets_and_zero_cases():
    # duplicated spans count as many times as they occur, on both sides
    scores = span_f1([[("a", "x"), ("a", "x"), ("b", "y")]], [[("a", "x"), ("b", "z")]])
    assert (scores["true_positives"], scores["num_predicted"], scores["num_gold"]) == (1, 3, 2)
    assert scores["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert span_f1([[]], [[]])["f1"] == 0.0  # seqeval's convention with nothing to find
    with pytest.raises(ValueError, match="pair up"):
        span_f1([[]], [])


def test_slots_round_trip_and_scores():
    slots = [("time", "five am"), ("date", "this week")]
    assert parse_slots(format_slots(slots)) == slots
    assert format_slots([]) == "None" and parse_slots("None") == []
    assert parse_slots("Time :  Five AM ; junk ; date:") == [("time", "five am")]  # malformed pieces are dropped
    predictions = ["time: five am; date: this week", "None", "place: paris", "time: six"]
    references = ["date: this week; time: five am", "None", "place: berlin", "None"]
    scores = slot_scores(predictions, references)
    # true positives 2, predicted 4, gold 3
    precision, recall = 2 / 4, 2 / 3
    assert scores["slot_precision"] == pytest.approx(precision)
    assert scores["slot_recall"] == pytest.approx(recall)
    assert scores["slot_f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert scores["exact_match"] == pytest.approx(2 / 4)  # slot order does not matter; "None" == "None"
    assert exact_match(["A  b"], ["a b"]) == 1.0


def test_entities_json_round_trip_scores_and_invalid_json():
    entities = [("person", "Ada Lovelace"), ("location", "London")]
    text = format_entities(entities)
    assert json.loads(text) == {"person": ["Ada Lovelace"], "organization": [], "location": ["London"]}
    assert parse_entities(text) == entities
    assert parse_entities("```json\n" + text + "\n```") == entities
    for bad in ('{"person": "Ada"}', "[1, 2]", '{"person": ["Ada"]', "no json"):
        assert parse_entities(bad) is None
    with pytest.raises(ValueError, match="not among the JSON keys"):
        format_entities([("date", "today")])
    references = [format_entities(entities), format_entities([("organization", "Google")])]
    predictions = ['{"person": ["Ada Lovelace"], "location": ["Paris"]}', '{"organization": ["Google"']
    scores = entity_scores(predictions, references)
    assert scores["valid_json_rate"] == 0.5
    assert scores["entity_precision"] == pytest.approx(1 / 2)  # 1 of 2 predicted (the invalid answer predicts none)
    assert scores["entity_recall"] == pytest.approx(1 / 3)
    assert scores["entity_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


def test_translation_scores():
    references = ["The cat sits on the mat.", "It is raining today."]
    perfect = translation_scores(references, references, target_language="en")
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    poor = translation_scores(["A dog runs.", "Sunny weather."], references, target_language="en")
    assert poor["bleu"] < 20 and 0 < poor["chrf"] < 50
    # Chinese references are segmented with sacrebleu's "zh" tokenizer, which changes BLEU
    zh_refs, zh_hyps = ["我今天很高兴见到你"], ["我今天很高兴看到你"]
    zh = translation_scores(zh_hyps, zh_refs, target_language="zh")
    assert zh["bleu"] == pytest.approx(sacrebleu.corpus_bleu(zh_hyps, [zh_refs], tokenize="zh").score)
    assert zh["bleu"] != pytest.approx(sacrebleu.corpus_bleu(zh_hyps, [zh_refs], tokenize="13a").score)
    with pytest.raises(ImportError, match="unbabel-comet"):
        translation_scores(references, references, sources=references, comet_model="Unbabel/wmt22-comet-da")


def _greedy_reference(model, ids, max_new_tokens, eos_id):
    """Greedy decoding one prompt at a time with full forwards and argmax: no padding, no cache, no generate()."""
    ids = list(ids)
    out = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        if token == eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


def test_generate_completions_matches_unpadded_greedy_decoding(tokenizer):
    model = build_model("llama", len(tokenizer), seed=3).eval()
    prompts = [
        [{"role": "user", "content": "Wake me up at seven"}],
        [{"role": "user", "content": "Play some jazz"}],
        "Turn off the light",
        [{"role": "user", "content": "Who sang this song and what is the weather tomorrow"}],
        "Set a timer",
    ]
    batched = generate_completions(model, tokenizer, prompts, max_new_tokens=6, batch_size=4, disable_progress=True)
    single = generate_completions(model, tokenizer, prompts, max_new_tokens=6, batch_size=1, disable_progress=True)
    assert batched == single
    for prompt, completion in zip(prompts, batched):
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
            ids = ids["input_ids"]
        expected = _greedy_reference(model, ids, 6, tokenizer.eos_token_id)
        assert completion == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert model.training is False


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_reference_losses_match_a_plain_torch_computation(tokenizer, kind):
    model = build_model(kind, len(tokenizer), seed=5).eval()
    prompts = [
        [{"role": "user", "content": "Wake me up at seven"}],
        "Turn off the light",
        [{"role": "user", "content": "Who sang this song and what is the weather tomorrow"}],
        "Set a timer",
        "Play",
    ]
    references = ["time: seven", "None", "weather: tomorrow; song: this song", "None", "music: jazz music please"]
    batched = reference_losses(model, tokenizer, prompts, references, batch_size=3, disable_progress=True)
    single = reference_losses(model, tokenizer, prompts, references, batch_size=1, disable_progress=True)
    for prompt, reference, (nll, count), (nll_single, count_single) in zip(prompts, references, batched, single):
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt)["input_ids"]
        else:
            prompt_ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        answer = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([list(prompt_ids) + answer])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        # token t is predicted by the logits at t - 1
        expected = -sum(log_probs[len(prompt_ids) + k - 1, token].item() for k, token in enumerate(answer))
        assert count == count_single == len(answer)
        assert nll == pytest.approx(expected, rel=1e-4)
        assert nll_single == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="one reference per prompt"):
        reference_losses(model, tokenizer, prompts, references[:2])
    # a forward without `logits_to_keep` (older or custom models) gives the same losses
    plain_forward = model.forward
    model.forward = lambda input_ids, attention_mask, position_ids: plain_forward(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    )
    fallback = reference_losses(model, tokenizer, prompts, references, batch_size=3, disable_progress=True)
    assert [n for _, n in fallback] == [n for _, n in batched]
    assert [nll for nll, _ in fallback] == pytest.approx([nll for nll, _ in batched], rel=1e-5)


def test_max_generate_scores_the_first_rows_and_takes_the_reference_loss_of_all(tokenizer, tmp_path):
    """`max_generate`: only each language's first rows are generated and scored by the task metric; the reference
    loss is the same as without the limit; the results and the table say how many rows were generated."""
    model = build_model("llama", len(tokenizer), seed=3).eval()
    examples = [
        {"language": lang, "prompt": f"{text} ({lang})", "reference": ref}
        for lang in ("de", "fr")
        for text, ref in (("Turn off the light", "light"), ("Set a timer", "timer"), ("Play jazz", "music"))
    ]
    scored = []

    def score(predictions, references, lang):
        scored.append((lang, list(predictions), list(references)))
        return {"matches": float(sum(p == r for p, r in zip(predictions, references)))}

    settings = dict(task="t", run="baseline", main_metric="matches", max_new_tokens=4, batch_size=2,
                    language_groups={"transfer": ["de", "fr"]})  # fmt: skip
    full = evaluate_examples(model, tokenizer, examples, score, output_dir=str(tmp_path / "full"), **settings)
    scored.clear()
    limited = evaluate_examples(
        model, tokenizer, examples, score, output_dir=str(tmp_path / "limited"), max_generate=2, **settings
    )
    first = [examples[i] for i in (0, 1, 3, 4)]
    expected = generate_completions(model, tokenizer, [e["prompt"] for e in first], max_new_tokens=4,
                                    disable_progress=True)  # fmt: skip
    assert scored == [("de", expected[:2], ["light", "timer"]), ("fr", expected[2:], ["light", "timer"])]
    for lang in ("de", "fr"):
        assert limited["languages"][lang]["num_examples"] == 3 and limited["languages"][lang]["num_generated"] == 2
        assert limited["languages"][lang]["reference_loss"] == pytest.approx(full["languages"][lang]["reference_loss"])
        assert "num_generated" not in full["languages"][lang]
    assert "num_generated" not in limited["groups"]["transfer"]  # a count, not a metric averaged over languages
    rows = [json.loads(line) for line in (tmp_path / "limited" / "eval_predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] is None for r in rows] == [False, False, True] * 2
    assert "| 3 (2 generated) |" in (tmp_path / "limited" / "eval_results.md").read_text()
    with pytest.raises(ValueError, match="max_generate_samples must be >= 1"):
        RecipeArguments(dataset_name="d", max_generate_samples=0)


def _results(run, scores):
    languages = {
        lang: {"slot_f1": value, "exact_match": value / 2, "num_examples": 10} for lang, value in scores.items()
    }
    results = {"task": "slot_filling", "run": run, "main_metric": "slot_f1", "languages": languages}
    results["language_groups"] = {"task": ["en-US"], "transfer": ["de-DE", "sw-KE"]}
    results["groups"] = summarize_groups(results, results["language_groups"])
    return results


def test_reports_table_json_and_plot(tmp_path):
    aligned = _results("aligned", {"en-US": 0.8, "de-DE": 0.6, "sw-KE": 0.3})
    baseline = _results("baseline", {"en-US": 0.8, "de-DE": 0.5, "sw-KE": 0.1})
    assert aligned["groups"]["transfer"]["slot_f1"] == pytest.approx(0.45)
    assert aligned["groups"]["transfer"]["num_languages"] == 2
    table = results_table(aligned)
    assert "| de-DE | transfer | 0.6000 | 0.3000 | 10 |" in table
    assert "| **mean: transfer** | | 0.4500 | 0.2250 | 2 languages |" in table
    paths = write_results(aligned, str(tmp_path), predictions=[{"language": "de-DE", "prediction": "None"}])
    assert load_results(str(tmp_path)) == aligned
    assert (tmp_path / "eval_results.md").read_text().startswith("# slot_filling (aligned)")
    assert json.loads((tmp_path / "eval_predictions.jsonl").read_text()) == {"language": "de-DE", "prediction": "None"}
    assert len(paths) == 3
    plot = plot_results({"baseline": baseline, "aligned": aligned}, str(tmp_path / "plot.png"))
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="eval_results.json"):
        load_results(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------------------------------
# The task library's shape and the loading of task data and pairs
def test_every_task_module_has_what_a_recipe_uses():
    from trl_midalign.tasks import TASKS

    assert list(TASKS) == ["slot_filling", "translation", "structured_generation", "classification"]
    for name, module in TASKS.items():
        assert module.NAME == name and isinstance(module.MAIN_METRIC, str)
        for function in ("score", "examples", "train_dataset"):
            assert callable(getattr(module, function)), (name, function)
    # the main metric is one of the scores of the task
    assert "slot_f1" in TASKS["slot_filling"].score(["time: six"], ["time: six"], "en-US")
    assert "chrf" in TASKS["translation"].score(["Hallo"], ["Hallo"], "en-de")
    assert "entity_f1" in TASKS["structured_generation"].score(['{"person": []}'], ['{"person": []}'], "en")
    scores = TASKS["classification"].score(["a", "a", "b"], ["a", "b", "b"], "en", labels=["a", "b", "c", "d"])
    assert scores == pytest.approx(
        {"accuracy": 2 / 3, "majority_baseline": 2 / 3, "chance": 0.25, "majority_prediction_share": 2 / 3}
    )


def test_single_massive_file_gives_the_rows_of_each_partition(tmp_path):
    from testing_utils import write_jsonl

    from trl_midalign.tasks.loading import load_language_rows, load_split

    rows = [
        {"id": str(i), "locale": "en-US", "partition": partition, "utt": f"u{i}", "annot_utt": f"u{i}"}
        for i, partition in enumerate(["train", "train", "dev", "test"])
    ]
    path = write_jsonl(tmp_path / "en-US.jsonl", rows)
    assert load_split(path, None, "train")["id"] == ["0", "1"]  # not the dev and test rows
    assert load_split(path, None, "validation")["id"] == ["2"]
    assert load_language_rows(path, None, "test", ["en-US"], "locale")["id"] == ["3"]
    with pytest.raises(ValueError, match=r"has no rows for language\(s\) \['de-DE'\]"):
        load_language_rows(path, None, "test", ["de-DE"], "locale")
    with pytest.raises(ValueError, match="has no language column 'language'"):
        load_language_rows(path, None, "test", None, "language")
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"locale": "en-US", "utt": "u"}])
    with pytest.raises(ValueError, match="single file, which holds only the 'train' split"):
        load_split(plain, None, "test")


def test_alignment_pairs_are_checked_not_dropped(tmp_path):
    from testing_utils import write_jsonl

    from trl_midalign.tasks.loading import load_pair_dataset, pairs_from_lists

    pairs = pairs_from_lists(["Danke", "Hallo", "Tschüss"], ["Thanks", "Hello", "Bye"], "de", max_pairs=2)
    assert pairs.to_dict() == {
        "parallel_source": ["Danke", "Hallo"], "parallel_target": ["Thanks", "Hello"], "language": ["de", "de"],
    }  # fmt: skip
    # an empty side used to be dropped silently; it is refused, naming the row and the column
    with pytest.raises(ValueError, match=r"Row 1 of the de alignment pairs.*'parallel_target'"):
        pairs_from_lists(["Danke", "Hallo"], ["Thanks", " "], "de")
    translation = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"translation": {"de": "Danke", "en": "Thanks"}}, {"translation": {"fr": "Merci", "en": "Thanks"}},
         {"translation": {"de": "Hallo", "en": "Hello"}}],
    )  # fmt: skip
    args = types.SimpleNamespace(
        alignment_dataset_name=translation, alignment_dataset_config=None, alignment_dataset_split="train",
        alignment_pivot_language="en", language_column="language", max_alignment_pairs=None,
    )  # fmt: skip
    loaded = load_pair_dataset(args, ["de", "fr"], seed=0)
    assert sorted(zip(loaded["language"], loaded["parallel_source"], loaded["parallel_target"])) == [
        ("de", "Danke", "Thanks"), ("de", "Hallo", "Hello"), ("fr", "Merci", "Thanks"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="has no it-en pairs"):
        load_pair_dataset(args, ["it"], seed=0)


def test_card_section_without_a_trainer_card_is_the_card(tmp_path):
    from huggingface_hub import ModelCard

    from trl_midalign.tasks.report import write_card_section

    results = _results("aligned", {"en-US": 0.8, "de-DE": 0.6, "sw-KE": 0.3})
    path = write_card_section(
        str(tmp_path), results, base_model="org/base", aligned=True, train_languages=["en-US"],
        alignment_languages=["de-DE"], training_settings={"lora_r": 8}, repo_id="me/run",
    )  # fmt: skip
    card = ModelCard.load(path)
    assert card.data.language == ["de", "en", "sw"] and card.data.library_name == "peft"
    assert "| de-DE | transfer | 0.6000 | 0.3000 | 10 |" in card.text and "| `lora_r` | `8` |" in card.text
    assert 'base = AutoModelForCausalLM.from_pretrained("org/base")' in card.text


# ----------------------------------------------------------------------------------------------------------------------
# Label likelihood and SFTTrainer's tokenization
LABEL_PROMPTS = [
    "Wake me up at seven\n",
    [{"role": "user", "content": "Play some jazz"}],
    "Turn off the light and who sang this song\n",  # longer than the tiny Gemma's sliding window (8)
    "Set\n",
]
LABELS = ["time", "None", "music genre", "weather date"]


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen2"])
def test_label_log_likelihoods_match_a_plain_torch_computation(tokenizer, kind):
    from trl_midalign.tasks.report import label_log_likelihoods, tokenize_completion

    model = build_model(kind, len(tokenizer), seed=1).eval()
    # a small logits budget splits the labels into groups: the grouping must not change a number
    for max_logits in (2**26, 3 * 400 * 3):
        scores = label_log_likelihoods(
            model, tokenizer, LABEL_PROMPTS, LABELS, batch_size=3, max_logits=max_logits, disable_progress=True
        )
        for prompt, row in zip(LABEL_PROMPTS, scores):
            for label, (nll, count) in zip(LABELS, row):
                ids, start = tokenize_completion(tokenizer, prompt, label)
                with torch.no_grad():  # one unpadded row, all logits, no cache
                    log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
                expected = -sum(log_probs[t - 1, ids[t]].item() for t in range(start, len(ids)))
                assert count == len(ids) - start
                assert nll == pytest.approx(expected, rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="without duplicates"):
        label_log_likelihoods(model, tokenizer, LABEL_PROMPTS, ["a", "a"])


def test_prompt_and_completion_tokenization_equal_what_sft_trainer_trains_on(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_midalign.tasks.report import tokenize_completion, tokenize_prompt

    rows = [
        {"prompt": "Wake me up at seven\n", "completion": "time"},
        {"prompt": "Play\n", "completion": "music genre"},
        {
            "prompt": [{"role": "user", "content": "Play some jazz"}],
            "completion": [{"role": "assistant", "content": "None"}],
        },
    ]
    for row in rows:  # SFTTrainer refuses a dataset that mixes plain and chat rows: one trainer per row
        trainer = SFTTrainer(
            model=build_model("llama", len(tokenizer)),
            args=SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False),
            train_dataset=Dataset.from_list([row]),
            processing_class=tokenizer,
        )
        trained = trainer.train_dataset[0]
        ids, start = tokenize_completion(tokenizer, row["prompt"], row["completion"])
        assert ids == trained["input_ids"]
        assert [-100] * start + ids[start:] == trained["labels"]  # the loss covers exactly the completion
        assert tokenize_prompt(tokenizer, row["prompt"]) == trained["input_ids"][:start]
