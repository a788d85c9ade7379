"""Evaluation shared by the recipes: batched greedy generation, the task metrics, and per-language reports.

The metrics follow the paper's three tasks (Liu & Niehues, 2025, https://huggingface.co/papers/2502.14830):

- slot filling (MASSIVE) generated as `"slot: span; slot: span"` (or `"None"`), scored with span-level micro F1 in the
  manner of seqeval, plus exact match of the whole slot set;
- machine translation, scored with BLEU and chrF from sacrebleu (COMET when `unbabel-comet` is installed);
- named entities generated as JSON, scored with entity-level micro F1 and the rate of valid JSON.

Results are dicts of the form `{"task": ..., "run": ..., "main_metric": ..., "languages": {lang: {metric: value,
"num_examples": n}}, "groups": {...}}` written by [`write_results`] as JSON and a markdown table, and drawn by
[`plot_results`] as a bar plot of one metric per language (one bar per run, e.g. baseline vs aligned).
"""

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


RESULTS_FILE = "eval_results.json"
TABLE_FILE = "eval_results.md"
PLOT_FILE = "eval_results.png"
PREDICTIONS_FILE = "eval_predictions.jsonl"

NO_SLOTS = "None"
ENTITY_TYPES = ("person", "organization", "location")


# ----------------------------------------------------------------------------------------------------------------------
# Span F1 (shared by slots and entities)
def _normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


def span_f1(predicted: Sequence[Sequence[tuple[str, str]]], gold: Sequence[Sequence[tuple[str, str]]]) -> dict:
    """
    Micro-averaged precision, recall and F1 of typed spans, counted over a whole corpus.

    Each example contributes the multiset intersection of its predicted and gold `(type, text)` spans as true
    positives. This is the span-level metric of seqeval (a span counts only when its type and its whole extent are
    right), with the span's text standing in for its token offsets, since a generated answer has no offsets. With no
    true positive the scores are 0, as in seqeval.

    Args:
        predicted (`Sequence[Sequence[tuple[str, str]]]`):
            Predicted `(type, text)` spans of each example.
        gold (`Sequence[Sequence[tuple[str, str]]]`):
            Gold `(type, text)` spans of each example, in the same order.

    Returns:
        `dict`: `precision`, `recall`, `f1` (floats in [0, 1]) and the counts `true_positives`, `num_predicted`,
        `num_gold`.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"Got {len(predicted)} predictions for {len(gold)} references; they must pair up one to one.")
    true_positives = num_predicted = num_gold = 0
    for pred_spans, gold_spans in zip(predicted, gold):
        pred_counts = Counter((t, _normalize(s)) for t, s in pred_spans)
        gold_counts = Counter((t, _normalize(s)) for t, s in gold_spans)
        true_positives += sum((pred_counts & gold_counts).values())
        num_predicted += sum(pred_counts.values())
        num_gold += sum(gold_counts.values())
    precision = true_positives / num_predicted if num_predicted else 0.0
    recall = true_positives / num_gold if num_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if true_positives else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": true_positives,
        "num_predicted": num_predicted,
        "num_gold": num_gold,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Slot filling
def format_slots(slots: Sequence[tuple[str, str]]) -> str:
    """
    Write slots as the target string of the slot-filling recipe.

    Args:
        slots (`Sequence[tuple[str, str]]`):
            `(slot type, span text)` pairs in utterance order.

    Returns:
        `str`: `"type: span; type: span"`, or `"None"` when there is no slot.

    Example:

    ```python
    >>> format_slots([("time", "five am"), ("date", "this week")])
    'time: five am; date: this week'
    >>> format_slots([])
    'None'
    ```
    """
    return "; ".join(f"{slot}: {span}" for slot, span in slots) if slots else NO_SLOTS


def parse_slots(text: str) -> list[tuple[str, str]]:
    """
    Read generated slots back, the inverse of [`format_slots`].

    Pieces are separated by `;`, and each piece is split at its first `:` into a slot type and a span. Type and span
    are lower-cased with whitespace collapsed. `"None"`, an empty answer and pieces without a `:` or with an empty
    side yield no slot.

    Args:
        text (`str`):
            Generated answer.

    Returns:
        `list[tuple[str, str]]`: `(slot type, span text)` pairs.

    Example:

    ```python
    >>> parse_slots("time: Five  AM; date: this week")
    [('time', 'five am'), ('date', 'this week')]
    >>> parse_slots("None")
    []
    ```
    """
    slots = []
    for piece in str(text).strip().split(";"):
        slot, sep, span = piece.partition(":")
        slot, span = _normalize(slot), _normalize(span)
        if sep and slot and span:
            slots.append((slot, span))
    return slots


def slot_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """
    Slot-filling scores of generated answers against reference answers, both in the [`format_slots`] format.

    Args:
        predictions (`Sequence[str]`):
            Generated answers.
        references (`Sequence[str]`):
            Reference answers.

    Returns:
        `dict[str, float]`: `slot_f1`, `slot_precision`, `slot_recall` (span-level micro scores, see [`span_f1`]) and
        `exact_match` (fraction of examples whose whole set of slots is right, `"None"` included).
    """
    predicted = [parse_slots(p) for p in predictions]
    gold = [parse_slots(r) for r in references]
    scores = span_f1(predicted, gold)
    return {
        "slot_f1": scores["f1"],
        "slot_precision": scores["precision"],
        "slot_recall": scores["recall"],
        "exact_match": exact_match(predicted, gold),
    }


def exact_match(predicted: Sequence[Any], gold: Sequence[Any]) -> float:
    """
    Fraction of examples whose prediction equals the reference.

    Strings are compared after lower-casing and collapsing whitespace; lists of spans are compared as multisets.

    Args:
        predicted (`Sequence`):
            Predictions (strings or lists of spans).
        gold (`Sequence`):
            References, in the same order.

    Returns:
        `float`: in [0, 1]; 0 for an empty input.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"Got {len(predicted)} predictions for {len(gold)} references; they must pair up one to one.")

    def key(value):
        if isinstance(value, str):
            return _normalize(value)
        return Counter((t, _normalize(s)) for t, s in value)

    hits = sum(key(p) == key(g) for p, g in zip(predicted, gold))
    return hits / len(gold) if gold else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Named entities as JSON
def format_entities(entities: Sequence[tuple[str, str]], types: Sequence[str] = ENTITY_TYPES) -> str:
    """
    Write entities as the JSON target of the structured-generation recipe.

    Args:
        entities (`Sequence[tuple[str, str]]`):
            `(entity type, text)` pairs in sentence order.
        types (`Sequence[str]`, *optional*, defaults to `("person", "organization", "location")`):
            Keys of the JSON object, each present (with an empty list when the sentence has none of that type).

    Returns:
        `str`: a compact JSON object mapping each type to the list of its entity strings.

    Example:

    ```python
    >>> format_entities([("person", "Ada Lovelace"), ("location", "London")])
    '{"person": ["Ada Lovelace"], "organization": [], "location": ["London"]}'
    ```
    """
    unknown = sorted({t for t, _ in entities} - set(types))
    if unknown:
        raise ValueError(f"Entity types {unknown} are not among the JSON keys {list(types)}; add them to `types`.")
    return json.dumps({t: [text for kind, text in entities if kind == t] for t in types}, ensure_ascii=False)


def parse_entities(text: str) -> list[tuple[str, str]] | None:
    """
    Read a generated JSON answer back into `(entity type, text)` pairs.

    The answer is valid when it is a JSON object (optionally inside a ```json fence) whose values are lists of
    strings. Types are lower-cased.

    Args:
        text (`str`):
            Generated answer.

    Returns:
        `list[tuple[str, str]] | None`: the entities, or `None` when the answer is not valid JSON of that shape.

    Example:

    ```python
    >>> parse_entities('{"person": ["Ada Lovelace"], "location": []}')
    [('person', 'Ada Lovelace')]
    >>> parse_entities('{"person": "Ada"') is None
    True
    ```
    """
    text = str(text).strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    entities = []
    for kind, items in value.items():
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            return None
        entities.extend((str(kind).strip().lower(), item) for item in items)
    return entities


def entity_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """
    Structured-generation scores of generated JSON answers against reference answers (see [`format_entities`]).

    An invalid answer counts as predicting no entity, so it costs recall, and lowers `valid_json_rate`.

    Args:
        predictions (`Sequence[str]`):
            Generated answers.
        references (`Sequence[str]`):
            Reference answers (valid JSON).

    Returns:
        `dict[str, float]`: `entity_f1`, `entity_precision`, `entity_recall` (micro, see [`span_f1`]) and
        `valid_json_rate` (fraction of answers that parse).
    """
    gold = []
    for i, reference in enumerate(references):
        parsed = parse_entities(reference)
        if parsed is None:
            raise ValueError(f"Reference {i} is not valid entity JSON: {reference!r}. Write it with format_entities.")
        gold.append(parsed)
    parsed_predictions = [parse_entities(p) for p in predictions]
    scores = span_f1([p or [] for p in parsed_predictions], gold)
    valid = sum(p is not None for p in parsed_predictions)
    return {
        "entity_f1": scores["f1"],
        "entity_precision": scores["precision"],
        "entity_recall": scores["recall"],
        "valid_json_rate": valid / len(predictions) if predictions else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Translation
def sacrebleu_tokenizer(target_language: str | None) -> str:
    """
    The sacrebleu tokenizer suited to a target language: `"zh"` for Chinese, `"char"` for Japanese, Korean and Thai
    (written without spaces), `"13a"` (sacrebleu's default) otherwise.

    Args:
        target_language (`str` or `None`):
            Language code of the references, such as `"de"` or `"zh-CN"`.

    Returns:
        `str`: a value for `sacrebleu.corpus_bleu(..., tokenize=...)`.
    """
    base = (target_language or "").split("-")[0].split("_")[0].lower()
    if base == "zh":
        return "zh"
    if base in ("ja", "ko", "th"):
        return "char"
    return "13a"


def translation_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    target_language: str | None = None,
    sources: Sequence[str] | None = None,
    comet_model: str | None = None,
    comet_batch_size: int = 8,
) -> dict[str, float]:
    """
    Corpus BLEU and chrF of translations (sacrebleu), and COMET when asked for.

    Args:
        predictions (`Sequence[str]`):
            System translations.
        references (`Sequence[str]`):
            One reference translation per prediction.
        target_language (`str`, *optional*):
            Language of the references; picks the BLEU tokenizer (see [`sacrebleu_tokenizer`]).
        sources (`Sequence[str]`, *optional*):
            Source sentences; needed for COMET.
        comet_model (`str`, *optional*):
            A COMET checkpoint name such as `"Unbabel/wmt22-comet-da"`. Needs the `unbabel-comet` package.
        comet_batch_size (`int`, *optional*, defaults to `8`):
            Batch size of the COMET model.

    Returns:
        `dict[str, float]`: `bleu` and `chrf` (0-100), and `comet` (0-100) with `comet_model`.
    """
    try:
        import sacrebleu
    except ImportError as error:
        raise ImportError(
            "Translation scores need sacrebleu: `pip install sacrebleu` (or `pip install trl-midalign[recipes]`)."
        ) from error
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} translations for {len(references)} references; they must pair up one to one."
        )
    predictions, references = [str(p) for p in predictions], [str(r) for r in references]
    tokenize = sacrebleu_tokenizer(target_language)
    scores = {
        "bleu": sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }
    if comet_model is not None:
        if sources is None or len(sources) != len(predictions):
            raise ValueError("COMET needs one source sentence per translation: pass `sources`.")
        try:
            from comet import download_model, load_from_checkpoint
        except ImportError as error:
            raise ImportError(
                f"comet_model={comet_model!r} needs the COMET package: `pip install unbabel-comet`, or leave "
                "comet_model unset to report BLEU and chrF only."
            ) from error
        model = load_from_checkpoint(download_model(comet_model))
        data = [{"src": s, "mt": p, "ref": r} for s, p, r in zip(sources, predictions, references)]
        output = model.predict(data, batch_size=comet_batch_size, gpus=1 if torch.cuda.is_available() else 0)
        scores["comet"] = 100 * float(output.system_score)
    return scores


# ----------------------------------------------------------------------------------------------------------------------
# Generation
def tokenize_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """
    Token ids of a prompt exactly as TRL's `SFTTrainer` tokenizes the prompt of a prompt-completion row.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        prompt (`str` or `list[dict[str, str]]`):
            A plain prompt, or a conversational prompt (a list of `{"role", "content"}` messages), which is rendered
            with the chat template and the generation prompt.

    Returns:
        `list[int]`: the token ids.
    """
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    output = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(output["input_ids"])


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    synced_gpus: bool = False,
    desc: str = "Generating",
    disable_progress: bool = False,
) -> list[str]:
    """
    Greedy completions of prompts, generated in batches with left padding.

    Prompts are tokenized as in training (see [`tokenize_prompt`]), sorted by length so that each batch wastes little
    padding, and returned in the input order. Generation stops at the tokenizer's EOS or the model's generation EOS.

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The model, unwrapped from DDP/DeepSpeed (its ZeRO-3 hooks may stay).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer; a missing pad token falls back to EOS.
        prompts (`Sequence[str | list[dict[str, str]]]`):
            Plain or conversational prompts.
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Maximum number of generated tokens per prompt.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per generation batch.
        synced_gpus (`bool`, *optional*, defaults to `False`):
            Keep generating until every process is done, which DeepSpeed ZeRO-3 needs (its forward gathers the
            partitioned parameters from all processes). Every process must then call this with the same number of
            prompts.
        desc (`str`, *optional*, defaults to `"Generating"`):
            Label of the progress bar.
        disable_progress (`bool`, *optional*, defaults to `False`):
            Hide the progress bar (e.g. on processes other than the main one).

    Returns:
        `list[str]`: the decoded completions (special tokens removed, whitespace stripped), one per prompt.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
    eos_ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        eos_ids.update([value] if isinstance(value, int) else (value or []))
    device = next(model.parameters()).device
    encoded = [tokenize_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=disable_progress):
            indices = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in indices)
            input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, i in enumerate(indices):  # left padding: the prompts end where generation starts
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention_mask[row, width - len(encoded[i]) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids) or None,
                use_cache=True,
                synced_gpus=synced_gpus,
            )
            for row, i in enumerate(indices):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs


# ----------------------------------------------------------------------------------------------------------------------
# Reports
def summarize_groups(results: dict, groups: dict[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """
    Average each metric over groups of languages (e.g. languages with task data, with alignment data only, neither).

    Args:
        results (`dict`):
            Results with a `"languages"` mapping `{language: {metric: value, "num_examples": n}}`.
        groups (`dict[str, Sequence[str]]`):
            Group name to its languages; languages absent from the results are left out, empty groups dropped.

    Returns:
        `dict[str, dict[str, float]]`: group name to `{metric: unweighted mean over its languages, "num_languages": k}`.
    """
    summary = {}
    for name, languages in groups.items():
        present = [results["languages"][lang] for lang in languages if lang in results["languages"]]
        if not present:
            continue
        metrics = [m for m in present[0] if m != "num_examples"]
        summary[name] = {m: sum(scores[m] for scores in present) / len(present) for m in metrics}
        summary[name]["num_languages"] = len(present)
    return summary


# Metrics reported on a 0-100 scale (sacrebleu, COMET x 100); all others are fractions in [0, 1]
_PERCENT_METRICS = ("bleu", "chrf", "comet")


def _cell(value: Any, metric: str = "") -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}" if metric in _PERCENT_METRICS else f"{value:.4f}"
    return str(value)


def results_table(results: dict) -> str:
    """
    A markdown table of per-language results, then one row per language group.

    Args:
        results (`dict`):
            Results as described in this module's docstring.

    Returns:
        `str`: the table.
    """
    languages = results["languages"]
    if not languages:
        return "_no languages evaluated_\n"
    metrics = [m for m in next(iter(languages.values())) if m != "num_examples"]
    groups = results.get("language_groups", {})
    group_of = {lang: name for name, langs in groups.items() for lang in langs}
    lines = [
        "| language | group | " + " | ".join(metrics) + " | examples |",
        "|---|---|" + "---|" * len(metrics) + "---|",
    ]
    for lang, scores in languages.items():
        cells = " | ".join(_cell(scores[m], m) for m in metrics)
        lines.append(f"| {lang} | {group_of.get(lang, '')} | {cells} | {scores.get('num_examples', '')} |")
    for name, scores in results.get("groups", {}).items():
        cells = " | ".join(_cell(scores[m], m) for m in metrics)
        lines.append(f"| **mean: {name}** | | {cells} | {scores['num_languages']} languages |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str, predictions: Sequence[dict] | None = None) -> list[str]:
    """
    Write `eval_results.json`, `eval_results.md` and, when given, `eval_predictions.jsonl` into `output_dir`.

    Args:
        results (`dict`):
            Results as described in this module's docstring.
        output_dir (`str`):
            Directory to write into (created if needed).
        predictions (`Sequence[dict]`, *optional*):
            One record per evaluated example (language, prompt, prediction, reference).

    Returns:
        `list[str]`: the paths written.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, RESULTS_FILE), os.path.join(output_dir, TABLE_FILE)]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    title = f"# {results.get('task', 'Evaluation')} ({results.get('run', 'run')})\n\n"
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(title + results_table(results))
    if predictions is not None:
        paths.append(os.path.join(output_dir, PREDICTIONS_FILE))
        with open(paths[2], "w", encoding="utf-8") as f:
            for record in predictions:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return paths


def load_results(path: str) -> dict:
    """
    Read results written by [`write_results`].

    Args:
        path (`str`):
            An `eval_results.json` file, or the output directory that holds one.

    Returns:
        `dict`: the results.
    """
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No evaluation results at {path}; pass the output_dir of a finished recipe run or its {RESULTS_FILE}."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def plot_results(runs: dict[str, dict], path: str, metric: str | None = None) -> str:
    """
    Bar plot of one metric per language, one bar per run (e.g. `{"baseline": ..., "aligned": ...}`).

    Args:
        runs (`dict[str, dict]`):
            Run label to its results; languages are the union over runs in first-seen order (a run without a language
            has no bar there).
        path (`str`):
            PNG file to write.
        metric (`str`, *optional*):
            Metric to draw; defaults to the first run's `main_metric`.

    Returns:
        `str`: `path`.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: `pip install matplotlib` (or trl-midalign[plot]).") from error
    if not runs:
        raise ValueError("plot_results needs at least one run.")
    metric = metric or next(iter(runs.values()))["main_metric"]
    languages = list(dict.fromkeys(lang for results in runs.values() for lang in results["languages"]))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(languages) * max(1, len(runs)) + 2), 4))
    for k, (label, results) in enumerate(runs.items()):
        xs = [
            i + (k - (len(runs) - 1) / 2) * width for i, lang in enumerate(languages) if lang in results["languages"]
        ]
        ys = [results["languages"][lang][metric] for lang in languages if lang in results["languages"]]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks(range(len(languages)))
    ax.set_xticklabels(languages, rotation=45, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{next(iter(runs.values())).get('task', '')}: {metric} per language")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
