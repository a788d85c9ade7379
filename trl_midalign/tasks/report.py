"""Evaluation reports of the tasks: batched greedy generation, per-language tables, plots and the model card's
evaluation section.

Results are dicts of the form `{"task": ..., "run": ..., "main_metric": ..., "languages": {lang: {metric: value,
"num_examples": n}}, "groups": {...}}` written by [`write_results`] as JSON and a markdown table, and drawn by
[`plot_results`] as a bar plot of one metric per language (one bar per run, e.g. baseline vs aligned).
[`evaluate_examples`] does it all for a model: generation split over the processes, scores per language (plus the
teacher-forced `reference_loss` of [`reference_losses`]), files, plot.
The model card itself is written by the trainer (`trainer.create_model_card`, which for
[`~trl_midalign.AlignmentTrainer`] records the alignment settings); [`write_card_section`] adds the run's languages,
PEFT usage, settings and results to it.
"""

import contextlib
import copy
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from trl.trainer.utils import pad

from .._logging import get_logger
from ..model_card import section_marker, update_card
from ..probing.probe import pad_token_id


logger = get_logger(__name__)

RESULTS_FILE = "eval_results.json"
TABLE_FILE = "eval_results.md"
PLOT_FILE = "eval_results.png"
PREDICTIONS_FILE = "eval_predictions.jsonl"
COUNTS = ("num_examples", "num_generated")  # per-language row counts in the results, not metrics
PROBE_PLOTS = ("probe_curve.png", "probe_heatmap.png")
CARD_SECTION_NAME = "run and evaluation"
CARD_SECTION_MARKER = section_marker(CARD_SECTION_NAME)
# Metrics reported on a 0-100 scale (sacrebleu, COMET x 100); all others are fractions in [0, 1]
_PERCENT_METRICS = ("bleu", "chrf", "comet")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# ----------------------------------------------------------------------------------------------------------------------
# Names that may be published
def is_local_path(name_or_path: str) -> bool:
    """
    Whether a model or dataset name is a local filesystem path rather than a Hub id: anything that exists on disk, is
    absolute, starts with `.` or `~`, or is not of the form `name` / `owner/name`.
    """
    value = os.fspath(name_or_path)
    return (
        os.path.isabs(value)
        or value.startswith((".", "~"))
        or os.path.exists(value)
        or _HUB_ID.fullmatch(value) is None
    )


def public_name(name_or_path: str) -> str:
    """
    The name of a model or dataset as it may appear in anything published: a Hub id unchanged, a local path reduced
    to its last folder name (`/home/me/models/Llama-3-8B/` gives `Llama-3-8B`).
    """
    value = os.fspath(name_or_path)
    if not is_local_path(value):
        return value
    return os.path.basename(os.path.normpath(os.path.expanduser(value))) or "local-model"


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization as in training
def tokenize_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """
    Token ids of a prompt exactly as TRL's `SFTTrainer` tokenizes the prompt of a prompt-completion row.

    `SFTTrainer` does it inside its dataset preparation (`trl.data_utils._tokenize`, private): the tokenizer's call for a
    plain prompt, the chat template with the generation prompt for a conversational one. This is the same, tested
    against the prompt part of the rows `SFTTrainer` tokenizes (`tests/test_tasks.py`).

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


def tokenize_completion(
    tokenizer, prompt: str | list[dict[str, str]], completion: str | list[dict[str, str]]
) -> tuple[list[int], int]:
    """
    Token ids of a prompt-completion row as TRL's `SFTTrainer` tokenizes it for training, and where its completion
    (the tokens of the training loss) starts.

    As `SFTTrainer`: a plain row gets the EOS token appended to its completion and is tokenized as one text; a
    conversational row is rendered with the chat template, prompt and completion together; the completion starts
    where the tokens of the prompt alone ([`tokenize_prompt`]) and of the whole row diverge
    (`trl.data_utils.common_prefix_length`).

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        prompt (`str` or `list[dict[str, str]]`):
            Plain prompt or chat messages.
        completion (`str` or `list[dict[str, str]]`):
            The answer: a string (a conversational prompt makes it an assistant message) or chat messages.

    Returns:
        `tuple[list[int], int]`: the row's token ids and the index of its first completion token.
    """
    from trl.data_utils import common_prefix_length

    prompt_ids = tokenize_prompt(tokenizer, prompt)
    if isinstance(prompt, str):
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has no EOS token, which SFTTrainer appends to every completion.")
        text = completion if completion.endswith(tokenizer.eos_token) else completion + tokenizer.eos_token
        ids = list(tokenizer(prompt + text)["input_ids"])
    else:
        messages = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        ids = tokenizer.apply_chat_template(list(prompt) + list(messages), tokenize=True, return_dict=True)
        ids = list(ids["input_ids"])
    return ids, common_prefix_length(prompt_ids, ids)


def _left_pad(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` of token sequences padded on the left, so that all end at the last position."""
    input_ids = pad(sequences, padding_value=pad_id, padding_side="left")
    attention_mask = pad([torch.ones_like(ids) for ids in sequences], padding_value=0, padding_side="left")
    return input_ids, attention_mask


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode (no dropout) for the block, then back in its former mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------------
# Generation
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
    Greedy completions of prompts, generated in batches with left padding and the KV cache.

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
    pad_id = pad_token_id(tokenizer)
    eos_ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        eos_ids.update([value] if isinstance(value, int) else (value or []))
    device = next(model.parameters()).device
    encoded = [torch.tensor(tokenize_prompt(tokenizer, p), dtype=torch.long) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with _eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=disable_progress):
            indices = order[start : start + batch_size]
            # Left padding: the prompts end where generation starts
            input_ids, attention_mask = _left_pad([encoded[i] for i in indices], pad_id)
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
            width = input_ids.shape[1]
            for row, i in enumerate(indices):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return outputs


# ----------------------------------------------------------------------------------------------------------------------
# Teacher-forced scores: the LM head only where a scored token is predicted
def _logits_at(model, inputs: dict, keep: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """
    Logits of the positions where `keep` (bool, `(batch, seq)`) is true, as a `(num_kept, vocab)` tensor, and the
    model's cache. The mask goes to the forward as `logits_to_keep`, so the LM head (with a large vocabulary the costly
    part) only runs on those positions; a forward that takes no `logits_to_keep`, or no mask for it, gives all logits,
    of which the kept ones are taken.
    """
    try:
        outputs = model(**inputs, logits_to_keep=keep)
    except (TypeError, IndexError):  # no `logits_to_keep`, or one that only takes a count (older transformers)
        outputs = model(**inputs)
    logits = outputs.logits
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:
        logits = logits[keep]
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(outputs.logits.shape)} for {int(keep.sum())} "
            "kept positions; its forward's `logits_to_keep` is not the transformers one."
        )
    return logits, cache


def _cache_argument(model) -> str:
    """The name of the KV-cache argument of `model`'s forward: `cache` (transformers 5.25), else `past_key_values`."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`log p(target)` of each row of `logits` (`(n, vocab)`), computed in float32: a `(n,)` tensor."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def completion_nlls(
    model,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
    desc: str = "Scoring",
    disable_progress: bool = False,
) -> list[float]:
    """
    Summed negative log-likelihood (nats) of the tokens `sequence[start:]` of each sequence given the tokens before:
    the training loss of a completion, summed instead of averaged.

    Sequences are sorted by length and batched with left padding (positions counted from each sequence's first real
    token), and the LM head runs only on the positions that predict a scored token (`logits_to_keep` as a boolean mask,
    see [`_logits_at`]).

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The model, in eval mode.
        sequences (`Sequence[Sequence[int]]`):
            Token ids.
        starts (`Sequence[int]`):
            Index of the first scored token of each sequence, at least 1.
        pad_id (`int`):
            The padding id (see [`~trl_midalign.probing.probe.pad_token_id`]).
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per forward pass.
        desc (`str`), disable_progress (`bool`):
            The progress bar.

    Returns:
        `list[float]`: one summed NLL per sequence.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    nlls = [0.0] * len(sequences)
    for begin in tqdm(range(0, len(order), batch_size), desc=desc, disable=disable_progress):
        indices = order[begin : begin + batch_size]
        input_ids, attention_mask = _left_pad([torch.tensor(sequences[i], dtype=torch.long) for i in indices], pad_id)
        width = input_ids.shape[1]
        keep = torch.zeros_like(input_ids, dtype=torch.bool)  # position p predicts the token at p + 1
        for row, i in enumerate(indices):
            keep[row, width - len(sequences[i]) + starts[i] - 1 : width - 1] = True
        targets = input_ids[:, 1:][keep[:, :-1]]
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0).to(device),
        }
        logits, _ = _logits_at(model, inputs, keep.to(device))
        token_nll = -_token_log_probs(logits, targets.to(device)).double().cpu()
        sums = torch.zeros(len(indices), dtype=torch.float64).index_add_(0, keep.nonzero()[:, 0], token_nll)
        for row, i in enumerate(indices):
            nlls[i] = sums[row].item()
    return nlls


@torch.no_grad()
def reference_losses(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    references: Sequence[str],
    batch_size: int = 8,
    desc: str = "Scoring references",
    disable_progress: bool = False,
) -> list[tuple[float, int]]:
    """
    Teacher-forced loss of each reference answer after its prompt: the task's training loss on evaluation examples.

    A generated answer is either right or wrong; this loss also shows a model that is getting closer, so it separates
    two runs with fewer examples than a generation metric. Each sequence is the prompt as generation sees it (see
    [`tokenize_prompt`]) followed by the reference tokenized on its own and the tokenizer's EOS; only the reference
    and EOS tokens are scored, with the LM head on their positions only (see [`completion_nlls`]).

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The model, unwrapped from DDP/DeepSpeed (under ZeRO-3 every process must call this with as many prompts).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer; a missing pad token falls back to EOS.
        prompts (`Sequence[str | list[dict[str, str]]]`):
            Plain or conversational prompts.
        references (`Sequence[str]`):
            One reference answer per prompt.
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per forward pass.
        desc (`str`, *optional*, defaults to `"Scoring references"`):
            Label of the progress bar.
        disable_progress (`bool`, *optional*, defaults to `False`):
            Hide the progress bar.

    Returns:
        `list[tuple[float, int]]`: per prompt, the summed negative log-likelihood (nats) of its answer tokens and their
        number.
    """
    if len(prompts) != len(references):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(references)} references; give one reference per prompt."
        )
    pad_id = pad_token_id(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences, starts = [], []
    for i, (prompt, reference) in enumerate(zip(prompts, references)):
        prompt_ids = tokenize_prompt(tokenizer, prompt)
        if not prompt_ids:
            raise ValueError(f"Prompt {i} ({prompt!r}) has no tokens: the answer's first token would follow nothing.")
        answer = list(tokenizer(reference, add_special_tokens=False)["input_ids"]) + eos
        sequences.append(prompt_ids + answer)
        starts.append(len(prompt_ids))
    with _eval_mode(model):
        nlls = completion_nlls(model, sequences, starts, pad_id, batch_size, desc, disable_progress)
    return [(nll, len(ids) - start) for nll, ids, start in zip(nlls, sequences, starts)]


@torch.no_grad()
def label_log_likelihoods(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    labels: Sequence[str],
    batch_size: int = 8,
    max_logits: int = 2**26,
    desc: str = "Scoring labels",
    disable_progress: bool = False,
) -> list[list[tuple[float, int]]]:
    """
    The summed negative log-likelihood of every label as the completion of every prompt: exact classification by
    label likelihood (predict the label of least NLL), no generation.

    Each (prompt, label) row is tokenized as `SFTTrainer` tokenizes it for training ([`tokenize_completion`]: the
    label and EOS, or the chat template's assistant turn), and its NLL is the summed training loss of its completion
    tokens. The prompt runs once: the tokens every label's row shares go through the model in batches of prompts
    (left padding) with the KV cache, which is then repeated for the labels, whose tokens run in one more forward
    (right padding after the cache). The LM head runs only on the positions that predict a completion token.

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The model, unwrapped from DDP/DeepSpeed (under ZeRO-3 every process must call this with as many prompts).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer; a missing pad token falls back to EOS.
        prompts (`Sequence[str | list[dict[str, str]]]`):
            Plain or conversational prompts.
        labels (`Sequence[str]`):
            The label set, the same for every prompt.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per forward pass.
        max_logits (`int`, *optional*, defaults to `2**26`):
            At most this many logits (positions x vocabulary) in one forward: the labels of a batch are split into
            groups to stay below it (256 MB of float32).
        desc (`str`), disable_progress (`bool`):
            The progress bar.

    Returns:
        `list[list[tuple[float, int]]]`: per prompt, per label (in `labels` order), the summed NLL (nats) of the
        label's completion tokens and their number.
    """
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"The labels must be a non-empty list without duplicates, got {list(labels)!r}.")
    pad_id = pad_token_id(tokenizer)
    rows = []  # per prompt: (shared prefix, [(continuation, first scored index in it) per label])
    for i, prompt in enumerate(prompts):
        encoded = [tokenize_completion(tokenizer, prompt, label) for label in labels]
        shared = min(start for _, start in encoded)
        for ids, _ in encoded[1:]:
            shared = min(shared, next((j for j, (a, b) in enumerate(zip(ids, encoded[0][0])) if a != b), len(ids)))
        if shared < 1:
            raise ValueError(f"Prompt {i} ({prompt!r}) has no tokens: a label's first token would follow nothing.")
        rows.append((encoded[0][0][:shared], [(ids[shared:], start - shared) for ids, start in encoded]))
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    # Labels per forward: the most that keep batch x labels x label tokens x vocabulary logits under max_logits
    longest = max(len(tokenizer(f"{label}{tokenizer.eos_token or ''}")["input_ids"]) for label in labels) + 2
    group = max(1, min(len(labels), max_logits // max(1, batch_size * longest * vocab)))
    cache_argument = _cache_argument(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[list[tuple[float, int]]] = [[] for _ in rows]
    with _eval_mode(model):
        for begin in tqdm(range(0, len(order), batch_size), desc=desc, disable=disable_progress):
            indices = order[begin : begin + batch_size]
            prefix_ids, prefix_mask = _left_pad([torch.tensor(rows[i][0], dtype=torch.long) for i in indices], pad_id)
            lengths = prefix_mask.sum(-1)
            last = torch.zeros_like(prefix_ids, dtype=torch.bool)
            last[:, -1] = True
            inputs = {
                "input_ids": prefix_ids.to(device),
                "attention_mask": prefix_mask.to(device),
                "position_ids": (prefix_mask.cumsum(-1) - 1).clamp(min=0).to(device),
                "use_cache": True,
            }
            logits, cache = _logits_at(model, inputs, last.to(device))
            first = torch.log_softmax(logits.float(), dim=-1)  # (batch, vocab): predicts each continuation's 1st token
            nll = torch.zeros(len(indices), len(labels), dtype=torch.float64)
            for low in range(0, len(labels), group):
                ks = range(low, min(low + group, len(labels)))
                conts = [rows[i][1][k] for i in indices for k in ks]  # row r: prompt r // len(ks), label ks[r % ...]
                cont_ids = pad([torch.tensor(c, dtype=torch.long) for c, _ in conts], padding_value=pad_id)
                cont_mask = pad([torch.ones(len(c), dtype=torch.long) for c, _ in conts], padding_value=0)
                keep = torch.zeros_like(cont_ids, dtype=torch.bool)  # position j predicts the token at j + 1
                for r, (c, scored) in enumerate(conts):
                    keep[r, max(scored, 1) - 1 : len(c) - 1] = True
                    if scored == 0:
                        nll[r // len(ks), ks[r % len(ks)]] -= first[r // len(ks), c[0]].item()
                targets = cont_ids[:, 1:][keep[:, :-1]]
                repeated = copy.deepcopy(cache)
                repeated.batch_repeat_interleave(len(ks))
                positions = lengths.repeat_interleave(len(ks))[:, None] + torch.arange(cont_ids.shape[1])
                inputs = {
                    "input_ids": cont_ids.to(device),
                    "attention_mask": torch.cat([prefix_mask.repeat_interleave(len(ks), 0), cont_mask], -1).to(device),
                    "position_ids": positions.to(device),
                    cache_argument: repeated,
                    "use_cache": True,
                }
                logits, _ = _logits_at(model, inputs, keep.to(device))
                token_nll = -_token_log_probs(logits, targets.to(device)).double().cpu()
                sums = torch.zeros(len(conts), dtype=torch.float64).index_add_(0, keep.nonzero()[:, 0], token_nll)
                for r in range(len(conts)):
                    nll[r // len(ks), ks[r % len(ks)]] += sums[r]
                del repeated
            for row, i in enumerate(indices):
                counts = [len(c) - scored for c, scored in rows[i][1]]
                results[i] = [(nll[row, k].item(), counts[k]) for k in range(len(labels))]
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation of a run
def evaluate_examples(
    model,
    tokenizer,
    examples: Sequence[dict],
    score: Callable[[list[str], list[str], str], dict[str, float]],
    *,
    task: str,
    run: str,
    main_metric: str,
    output_dir: str,
    max_new_tokens: int,
    batch_size: int,
    language_groups: dict[str, list[str]],
    zero3: bool = False,
    compare_with: str | None = None,
    extra: dict | None = None,
    labels: Sequence[str] | None = None,
    max_generate: int | None = None,
) -> dict | None:
    """
    Generate an answer for every example (split over the processes), score each language, and write the results,
    the predictions and the plot into `output_dir` (main process).

    Each language gets the task's metrics (`score`) plus `reference_loss`: the teacher-forced loss per reference token
    (nats, lower is better, see [`reference_losses`]), which tells runs apart with fewer examples than the metrics of
    generated answers.

    Args:
        model:
            The (unwrapped) model to generate with; under ZeRO-3 every process must take part.
        tokenizer:
            Its tokenizer.
        examples (`Sequence[dict]`):
            Each with `language`, `prompt` (plain or chat messages) and `reference`; other keys are kept in the
            predictions file.
        score (`Callable[[list[str], list[str], str], dict[str, float]]`):
            `score(predictions, references, language)` for one language's examples.
        task (`str`), run (`str`), main_metric (`str`):
            Recorded in the results (`run` is `"aligned"` or `"baseline"`).
        output_dir (`str`):
            Where the files go.
        max_new_tokens (`int`), batch_size (`int`):
            Generation settings.
        language_groups (`dict[str, list[str]]`):
            Groups of languages averaged in the report (task, aligned, transfer).
        zero3 (`bool`, *optional*, defaults to `False`):
            Whether the model is partitioned by DeepSpeed ZeRO-3.
        compare_with (`str`, *optional*):
            Another run's results, drawn next to this run in the plot.
        extra (`dict`, *optional*):
            More fields for the results JSON.
        labels (`Sequence[str]`, *optional*):
            A label set (classification): instead of generating, each example's prediction is the label of least
            completion NLL ([`label_log_likelihoods`]) and its `reference_loss` is that of its reference label; the
            label NLLs go into the predictions file.
        max_generate (`int`, *optional*):
            Generate only for the first `max_generate` examples of each language: the task's metrics come from those,
            `reference_loss` from all; the other rows' `prediction` is `None`, and a language with fewer generated
            than evaluated rows records `num_generated`. Not used with `labels`, which generate nothing. Under ZeRO-3
            a process with fewer rows to generate generates extra ones in step with the others and drops them.

    Returns:
        `dict | None`: the results on the main process, `None` on the others.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    indexed = [dict(example, index=i) for i, example in enumerate(examples)]
    seen: dict[str, int] = {}
    generated = set()  # the indices of the examples answered by generation
    for example in indexed:
        seen[example["language"]] = seen.get(example["language"], 0) + 1
        if max_generate is None or seen[example["language"]] <= max_generate:
            generated.add(example["index"])
    with state.split_between_processes(indexed, apply_padding=True) as shard:
        prompts = [example["prompt"] for example in shard]
        if labels is not None:  # classification: the label of least NLL, no generation
            unknown = sorted({e["reference"] for e in shard} - set(labels))
            if unknown:
                raise ValueError(f"References {unknown[:5]} are not in the label set {list(labels)}.")
            scored = label_log_likelihoods(
                model,
                tokenizer,
                prompts,
                labels,
                batch_size=batch_size,
                disable_progress=not state.is_local_main_process,
            )
            records = []
            for example, row in zip(shard, scored):
                nlls = [nll for nll, _ in row]
                gold = labels.index(example["reference"])
                best = min(range(len(labels)), key=nlls.__getitem__)
                records.append(
                    dict(example, prediction=labels[best], reference_nll=row[gold][0], reference_tokens=row[gold][1],
                         label_nlls=nlls)
                )  # fmt: skip
        else:
            answered = [k for k, example in enumerate(shard) if example["index"] in generated]
            asked = answered
            if zero3 and state.num_processes > 1:  # in step: every process generates as many batches (the extra
                # rows' answers are dropped)
                most = max(gather_object([len(answered)]))
                rest = [k for k, example in enumerate(shard) if example["index"] not in generated]
                asked = answered + rest[: most - len(answered)]
            predictions = [None] * len(shard)
            completions = generate_completions(
                model,
                tokenizer,
                [prompts[k] for k in asked],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                synced_gpus=zero3 and state.num_processes > 1,
                desc=f"Evaluating {task} (process {state.process_index})",
                disable_progress=not state.is_local_main_process,
            )
            for k, completion in zip(answered, completions):  # `asked` starts with `answered`
                predictions[k] = completion
            losses = reference_losses(
                model,
                tokenizer,
                prompts,
                [example["reference"] for example in shard],
                batch_size=batch_size,
                disable_progress=not state.is_local_main_process,
            )
            records = [
                dict(example, prediction=p, reference_nll=nll, reference_tokens=n)
                for example, p, (nll, n) in zip(shard, predictions, losses)
            ]
    if state.num_processes > 1:
        records = gather_object(records)
    if not state.is_main_process:
        return None
    by_index = {}
    for record in records:  # padding repeats the last example: keep the first copy of each
        by_index.setdefault(record["index"], record)
    records = [by_index[i] for i in range(len(examples))]

    languages: dict[str, dict] = {}
    for lang in dict.fromkeys(r["language"] for r in records):
        subset = [r for r in records if r["language"] == lang]
        answered = subset if labels is not None else [r for r in subset if r["index"] in generated]
        scores = score([r["prediction"] for r in answered], [r["reference"] for r in answered], lang)
        # Token-weighted, as the training loss: summed NLL of all reference tokens over their number
        loss = sum(r["reference_nll"] for r in subset) / max(1, sum(r["reference_tokens"] for r in subset))
        languages[lang] = {**scores, "reference_loss": loss, "num_examples": len(subset)}
        if len(answered) < len(subset):
            languages[lang]["num_generated"] = len(answered)
    results = {"task": task, "run": run, "main_metric": main_metric, "languages": languages, **(extra or {})}
    results["language_groups"] = {k: [lang for lang in v if lang in languages] for k, v in language_groups.items()}
    results["groups"] = summarize_groups(results, {**results["language_groups"], "all": list(languages)})
    for record in records:
        if not isinstance(record["prompt"], str):
            record["prompt"] = record["prompt"][-1]["content"]
    write_results(results, output_dir, predictions=records)
    runs = {run: results}
    if compare_with:
        other = load_results(compare_with)
        label = other.get("run", "other")
        # The label is drawn into the plot, which may be pushed: the folder's name, never a local path
        runs = {label if label != run else f"{label} ({public_name(compare_with)})": other, run: results}
        if "baseline" in runs:  # baseline first, whichever run is plotted
            runs = {"baseline": runs.pop("baseline"), **runs}
    try:
        plot_results(runs, os.path.join(output_dir, PLOT_FILE), metric=main_metric)
    except ImportError as error:
        logger.warning(f"No plot: {error}")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Tables, files and plots
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
        metrics = [m for m in present[0] if m not in COUNTS]
        summary[name] = {m: sum(scores[m] for scores in present) / len(present) for m in metrics}
        summary[name]["num_languages"] = len(present)
    return summary


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
    metrics = [m for m in next(iter(languages.values())) if m not in COUNTS]
    groups = results.get("language_groups", {})
    group_of = {lang: name for name, langs in groups.items() for lang in langs}
    lines = [
        "| language | group | " + " | ".join(metrics) + " | examples |",
        "|---|---|" + "---|" * len(metrics) + "---|",
    ]
    for lang, scores in languages.items():
        cells = " | ".join(_cell(scores[m], m) for m in metrics)
        count = scores.get("num_examples", "")
        if "num_generated" in scores:
            count = f"{count} ({scores['num_generated']} generated)"
        lines.append(f"| {lang} | {group_of.get(lang, '')} | {cells} | {count} |")
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
    from ..probing.plots import pyplot

    plt = pyplot()  # an ImportError that says how to install matplotlib without it
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


# ----------------------------------------------------------------------------------------------------------------------
# The model card's section of a run
def find_probe_plots(output_dir: str) -> list[str]:
    """
    Probe plots of a run, relative to `output_dir`: those at its top level, else those of the latest
    `layer_probe/step-*` folder written by [`~trl_midalign.LayerProbeCallback`].

    Args:
        output_dir (`str`):
            The run's output directory.

    Returns:
        `list[str]`: relative paths of the plots found (possibly empty).
    """
    found = [name for name in PROBE_PLOTS if os.path.isfile(os.path.join(output_dir, name))]
    if found:
        return found
    probe_root = os.path.join(output_dir, "layer_probe")
    if not os.path.isdir(probe_root):
        return []
    steps = [d for d in os.listdir(probe_root) if d.startswith("step-") and d[5:].isdigit()]
    for step in sorted(steps, key=lambda d: int(d[5:]), reverse=True):
        found = [
            f"layer_probe/{step}/{name}"
            for name in PROBE_PLOTS
            if os.path.isfile(os.path.join(probe_root, step, name))
        ]
        if found:
            return found
    return []


def card_section(
    base_model: str,
    task: str,
    train_languages: Sequence[str],
    alignment_languages: Sequence[str],
    aligned: bool,
    results: dict | None = None,
    training_settings: dict[str, Any] | None = None,
    plots: Sequence[str] = (),
    repo_id: str | None = None,
) -> str:
    """
    The model card's section about a recipe run: what the adapter is, how to load it with PEFT, the languages of its
    data, its settings, its evaluation and plots. No local path is written: a local base model appears by its folder
    name.

    Args:
        base_model (`str`):
            The model the adapter was trained on: a Hub id, or a local path.
        task (`str`):
            Recipe name, e.g. `"slot_filling"`.
        train_languages (`Sequence[str]`):
            Languages (or directions) of the task training data.
        alignment_languages (`Sequence[str]`):
            Languages of the alignment pairs (empty for a baseline).
        aligned (`bool`):
            Whether the run trained with the alignment loss (`False`: the plain SFT baseline).
        results (`dict`, *optional*):
            Evaluation results (see [`write_results`]).
        training_settings (`dict[str, Any]`, *optional*):
            Settings worth recording (learning rate, LoRA rank, ...).
        plots (`Sequence[str]`, *optional*):
            Plot files (relative paths in the repository) to show: evaluation and probe plots.
        repo_id (`str`, *optional*):
            The repository the card is for, used in the loading snippet.

    Returns:
        `str`: the section, starting with [`CARD_SECTION_MARKER`].
    """
    hub_base = base_model if base_model and not is_local_path(base_model) else None
    base_name = public_name(base_model) if base_model else "the base model"
    lines = [
        CARD_SECTION_MARKER,
        f"## {task} ({'aligned' if aligned else 'baseline'}) with trl-midalign",
        "",
        f"A LoRA adapter for `{base_name}`{'' if hub_base else ' (a local copy of the base model)'} trained with the "
        f"`{task}` recipe of trl-midalign.",
    ]
    if aligned:
        lines.append(
            "Alongside the task loss, a contrastive loss aligned the representations of parallel sentences at a middle "
            "layer, to improve transfer of the task to languages without task data."
        )
    else:
        lines.append("This is the plain supervised fine-tuning baseline (no alignment loss).")
    repository = repo_id or "<this repository>"
    lines += [
        "",
        "### Usage with PEFT",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{hub_base or f"path/to/{base_name}"}")',
        f'model = PeftModel.from_pretrained(base, "{repository}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repository}")',
        "```",
        "",
        "### Languages",
        "",
        f"- task training data: {', '.join(train_languages) or 'none'}",
        f"- alignment pairs: {', '.join(alignment_languages) or 'none'}",
        "",
    ]
    if training_settings:
        lines += ["### Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{name}` | `{value!r}` |" for name, value in training_settings.items()]
        lines.append("")
    if results is not None:
        lines += [f"### Evaluation ({results.get('main_metric', '')})", "", results_table(results)]
    for plot in plots:
        title = "Evaluation per language" if os.path.basename(plot) == PLOT_FILE else "Cross-lingual alignment probe"
        lines += [f"#### {title}", "", f"![{title}]({plot})", ""]
    return "\n".join(lines)


def write_card_section(
    output_dir: str,
    results: dict,
    *,
    base_model: str,
    aligned: bool,
    train_languages: Sequence[str],
    alignment_languages: Sequence[str],
    training_settings: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """
    Add a run's section (see [`card_section`]) to the model card `README.md` of `output_dir`, which
    `trainer.create_model_card` wrote; the section of an earlier evaluation is replaced, and without a card the section
    is the card. The plots found in `output_dir` (evaluation, and probe plots, see [`find_probe_plots`]) are shown,
    and the ISO codes of the run's languages (`"de-DE"`, `"de_pud"` and `"en-de"` give `"de"` and `"en"`) go into the
    card's `language` metadata.

    Args:
        output_dir (`str`):
            The run's output directory.
        results (`dict`):
            The run's evaluation results (see [`evaluate_examples`]).
        base_model, aligned, train_languages, alignment_languages, training_settings, repo_id:
            See [`card_section`].

    Returns:
        `str`: the path of the card.
    """
    plots = [PLOT_FILE] if os.path.isfile(os.path.join(output_dir, PLOT_FILE)) else []
    section = card_section(
        base_model,
        results.get("task", "evaluation"),
        train_languages,
        alignment_languages,
        aligned,
        results=results,
        training_settings=training_settings,
        plots=plots + find_probe_plots(output_dir),
        repo_id=repo_id,
    )
    languages = [*train_languages, *alignment_languages, *results.get("languages", {})]
    codes = {part for code in languages for part in code.split("_")[0].split("-") if part.isalpha()}
    codes = sorted(code for code in codes if code.islower() and len(code) in (2, 3))
    section = section.replace(CARD_SECTION_MARKER, "", 1)  # update_card marks it
    return update_card(output_dir, CARD_SECTION_NAME, section, {"language": codes} if codes else None)
