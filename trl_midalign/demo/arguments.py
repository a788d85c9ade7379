"""The arguments of `trl-midalign demo` (and of [`trl_midalign.demo.run.run_demo`])."""

from dataclasses import dataclass, field


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
