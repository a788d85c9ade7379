"""Cost of `LayerProbeCallback` during training, as a fraction of training time (issue 3: at most 5%).

Gemma 3 270M (float32, CPU) trained with `AlignmentTrainer` as a user would: the default `alternate` schedule, a real
task (translation into English of LibreOffice help paragraphs, German and Spanish) and alignment pairs (Japanese,
Hindi, Russian), LoRA r=8 on every projection. A `LayerProbeCallback` probes a held-out pair set (three languages)
every `--probe_every` steps so that one short run probes several times; each probe logs its own duration as
`probe/runtime`.

Measured: the seconds of one probe (mean of `probe/runtime`) and of one training step (the run's `train_runtime`
minus the probes, per step). The overhead of probing every K steps is then `probe / (K * step)`. The callback probes
at each evaluation by default, and transformers evaluates every `eval_steps` = `logging_steps` = 500 steps unless told
otherwise; the script prints the overhead at that default, at the measured `--probe_every`, and the smallest K that
stays within the budget.

    python benchmarks/probe_overhead.py                        # 30 steps, probing every 10, 2 threads
    python benchmarks/probe_overhead.py --probe_pairs_per_language 32

The model and data are cached under ~/.cache/trl_midalign after the first run (see `trl_midalign.demo`).
"""

import argparse
import math
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_midalign import AlignmentConfig, AlignmentTrainer, LayerProbeCallback
from trl_midalign.demo import gemma3_270m, libreoffice_parallel_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--probe_every", type=int, default=10, help="probe every this many steps in the measured run")
    parser.add_argument("--default_every", type=int, default=500, help="transformers' default eval_steps")
    parser.add_argument("--probe_languages", nargs="+", default=["fr", "ko", "pt"])
    parser.add_argument("--probe_pairs_per_language", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--align_layer", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    parser.add_argument("--budget", type=float, default=0.05, help="overhead limit to check against")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task_languages, align_languages = ["de", "es"], ["ja", "hi", "ru"]
    rows_needed = args.max_steps * args.batch_size
    pairs = libreoffice_parallel_pairs(
        task_languages + align_languages + args.probe_languages,
        max_pairs_per_language=max(rows_needed, args.probe_pairs_per_language),
        seed=0,
        max_chars=100,
    )
    by_language = {}
    for row in pairs:
        by_language.setdefault(row["language"], []).append(row)
    task = Dataset.from_list(
        [
            {"prompt": f"Translate to English: {row['parallel_source']}\n", "completion": row["parallel_target"]}
            for language in task_languages
            for row in by_language[language]
        ]
    )
    alignment = Dataset.from_list([row for language in align_languages for row in by_language[language]])
    probe_pairs = [
        row for language in args.probe_languages for row in by_language[language][: args.probe_pairs_per_language]
    ]

    model_dir = gemma3_270m()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as output_dir:
        config = AlignmentConfig(
            output_dir=output_dir,
            align_layer=args.align_layer,
            align_max_length=args.max_length,
            max_length=args.max_length,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.max_steps,
            learning_rate=5e-4,
            logging_steps=args.probe_every,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = AlignmentTrainer(
            model=model,
            args=config,
            train_dataset=task,
            alignment_dataset=alignment,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"),
        )
        callback = LayerProbeCallback(
            probe_pairs, trainer=trainer, every_n_steps=args.probe_every, max_length=args.max_length
        )
        trainer.add_callback(callback)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start

    history = trainer.state.log_history
    probe_seconds = [entry["probe/runtime"] for entry in history if "probe/runtime" in entry]
    train_runtime = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    probe_total = sum(probe_seconds)
    step = (train_runtime - probe_total) / args.max_steps
    probe = probe_total / len(probe_seconds)
    num_probe = len(probe_pairs)
    print(
        f"Gemma 3 270M, alternate schedule (task batches of {args.batch_size} rows and alignment batches of "
        f"{args.batch_size} pairs in turn), "
        f"max_length {args.max_length}, layer {args.align_layer}, {args.threads} threads, torch {torch.__version__}"
    )
    print(
        f"run: {args.max_steps} steps in {train_runtime:.1f} s (wall {wall:.1f} s), {len(probe_seconds)} probes of "
        f"{num_probe} pairs ({len(args.probe_languages)} languages x {args.probe_pairs_per_language}) took "
        f"{probe_total:.1f} s = {probe_total / train_runtime:.1%} of this run"
    )
    print(f"one training step: {step:.2f} s; one probe: {probe:.2f} s ({2 * num_probe / probe:.1f} sentences/s)")
    for every in sorted({args.probe_every, args.default_every}):
        overhead = probe / (every * step)
        verdict = "within" if overhead <= args.budget else "OVER"
        print(f"probing every {every} steps: overhead {overhead:.2%} ({verdict} the {args.budget:.0%} budget)")
    print(f"smallest interval within the budget: every {math.ceil(probe / (args.budget * step))} steps")


if __name__ == "__main__":
    main()
