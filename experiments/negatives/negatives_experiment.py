"""How many negatives per alignment step? Gemma 3 270M aligned on LibreOffice help pairs with 8, 32 and 128 pairs per
step (negatives = pairs per step - 1; 32 and 128 by gradient caching in mini-batches of 8), the same number of
optimizer steps, several seeds; retrieval accuracy at the aligned layer on held-out pairs of the trained languages and
of languages never trained on. Results go to a JSON-lines file (one line per run, so an interrupted grid keeps what it
finished), then a markdown table and a plot.

    nohup python experiments/negatives/negatives_experiment.py --output_dir outputs/negatives > outputs/negatives.log 2>&1 &
    nohup python experiments/negatives/negatives_experiment.py --output_dir outputs/negatives > outputs/negatives-2.log 2>&1 &

Start one worker per core: they share the grid through claim files in the output directory (delete the directory to
start over).
    python experiments/negatives/negatives_experiment.py --output_dir outputs/negatives --report_only   # table + plot again

The defaults were cut down to fit a heavily shared 2-core machine (see docs/negatives.md for the measured wall time):
aligned layer 6 of 18 (the demo aligns 12), 10 optimizer steps per run at a constant learning rate of 1e-3, English
paragraphs of at most 30 characters (16 tokens), 48 held-out pairs per language; alignment_only schedule, LoRA r=8
(dropout 0.1) on all linear layers of the blocks below the aligned layer (as `trl-midalign demo`), the demo's
languages. On an idle machine or a GPU, run the demo's setting: `--align_layer 12 --max_chars 100 --max_length 64
--eval_pairs_per_language 128 --max_steps 30`.
"""

import argparse
import json
import os
import statistics
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/negatives")
    parser.add_argument("--negatives", type=int, nargs="+", default=[8, 32, 128], help="pairs per alignment step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=10, help="optimizer steps of every run")
    parser.add_argument("--mini_batch_size", type=int, default=8, help="align_mini_batch_size for larger batches")
    parser.add_argument(
        "--learning_rate", type=float, default=1e-3, help="constant; twice the paper's 5e-4: few steps"
    )
    parser.add_argument(
        "--align_layer", type=int, default=6, help="aligned layer (the demo's probe picks 12; 6 halves the cost)"
    )
    parser.add_argument("--train_languages", nargs="+", default=["ja", "hi", "ru"])
    parser.add_argument("--unseen_languages", nargs="+", default=["fr", "ko", "pt"])
    parser.add_argument("--eval_pairs_per_language", type=int, default=48)
    parser.add_argument("--max_chars", type=int, default=30, help="longest English paragraph (characters)")
    parser.add_argument("--max_length", type=int, default=16, help="tokens per sentence")
    parser.add_argument("--threads", type=int, default=1, help="1 avoids oversubscribing shared cores")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the table and plot from results")
    return parser.parse_args(argv)


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@torch.no_grad()
def retrieval_at_layer(model, tokenizer, pairs, layer, max_length, batch_size=32):
    """Per language: mean of source->target and target->source retrieval accuracy of mean-pooled layer states."""
    from trl_midalign import layer_hidden_states, masked_mean_pool

    was_training = model.training
    model.eval()

    def embed(texts):
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        pooled = [None] * len(texts)
        for start in range(0, len(texts), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            states = layer_hidden_states(model, encoded["input_ids"], encoded["attention_mask"], layer)
            vectors = masked_mean_pool(states, encoded["attention_mask"]).float()
            for i, vector in zip(order[start : start + batch_size], vectors):
                pooled[i] = vector
        return torch.nn.functional.normalize(torch.stack(pooled), dim=-1)

    scores = {}
    for language in sorted(set(pairs["language"])):
        rows = pairs.filter(lambda row, language=language: row["language"] == language)
        similarity = embed(rows["parallel_source"]) @ embed(rows["parallel_target"]).T  # (n, n)
        truth = torch.arange(similarity.size(0))
        forward = (similarity.argmax(dim=1) == truth).float().mean().item()
        backward = (similarity.argmax(dim=0) == truth).float().mean().item()
        scores[language] = (forward + backward) / 2
    model.train(was_training)
    return scores


def split(pairs, languages, eval_n):
    from datasets import Dataset

    train, held_out = [], []
    for language in languages:
        rows = pairs.filter(lambda row, language=language: row["language"] == language).to_list()
        held_out += rows[:eval_n]
        train += rows[eval_n:]
    return Dataset.from_list(train), Dataset.from_list(held_out)


def train_once(args, model_dir, train_pairs, eval_pairs, negatives, seed):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_midalign import AlignmentConfig, AlignmentTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = AlignmentConfig(
        output_dir=os.path.join(args.output_dir, f"run-{negatives}-{seed}"),
        align_schedule="alignment_only",
        align_layer=args.align_layer,
        align_max_length=args.max_length,
        align_mini_batch_size=args.mini_batch_size if negatives > args.mini_batch_size else None,
        per_device_train_batch_size=negatives,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.max_steps // 6),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=seed,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    trainer = AlignmentTrainer(
        model=model,
        args=config,
        train_dataset=None,
        alignment_dataset=train_pairs.remove_columns(["language", "id"]),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start
    start = time.time()
    scores = retrieval_at_layer(trainer.model, tokenizer, eval_pairs, args.align_layer, args.max_length)
    return {
        "negatives": negatives,
        "seed": seed,
        "retrieval": scores,
        "train_seconds": train_seconds,
        "eval_seconds": time.time() - start,
        "pair_slots": negatives * args.max_steps,
        "train_log": [entry for entry in trainer.state.log_history if "loss" in entry],
    }


def group_mean(scores, languages):
    return sum(scores[language] for language in languages) / len(languages)


def report(args):
    path = os.path.join(args.output_dir, "results.jsonl")
    with open(path) as f:
        results = [json.loads(line) for line in f if line.strip()]
    base = next(r for r in results if r.get("negatives") == 0)
    runs = [r for r in results if r.get("negatives")]
    groups = (("trained", args.train_languages), ("unseen", args.unseen_languages))

    def stats(values):
        mean = statistics.fmean(values)
        return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = [
        f"Retrieval accuracy at layer {args.align_layer} of Gemma 3 270M on {args.eval_pairs_per_language} held-out "
        f"pairs per language (mean of both directions; chance about {1 / args.eval_pairs_per_language:.2f}) after "
        f"{args.max_steps} optimizer steps; mean +- standard deviation over seeds.",
        "",
        "| pairs per step | seeds | trained (" + ", ".join(args.train_languages) + ") | unseen ("
        + ", ".join(args.unseen_languages) + ") | train time per run |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    b = [group_mean(base["retrieval"], languages) for _, languages in groups]
    lines.append(f"| base model (no training) | - | {b[0]:.3f} | {b[1]:.3f} | - |")
    curve = {}
    for negatives in sorted({r["negatives"] for r in runs}):
        chosen = [r for r in runs if r["negatives"] == negatives]
        cells = []
        for name, languages in groups:
            mean, std = stats([group_mean(r["retrieval"], languages) for r in chosen])
            curve.setdefault(name, []).append((negatives, mean, std))
            cells.append(f"{mean:.3f} +- {std:.3f}")
        seconds = statistics.fmean(r["train_seconds"] for r in chosen)
        lines.append(f"| {negatives} | {len(chosen)} | {cells[0]} | {cells[1]} | {seconds:.0f} s |")
    lines += ["", "Per language (mean over seeds):", ""]
    languages = args.train_languages + args.unseen_languages
    lines.append("| pairs per step | " + " | ".join(languages) + " |")
    lines.append("|---|" + "---|" * len(languages))
    lines.append("| base | " + " | ".join(f"{base['retrieval'][lang]:.3f}" for lang in languages) + " |")
    for negatives in sorted({r["negatives"] for r in runs}):
        chosen = [r for r in runs if r["negatives"] == negatives]
        values = [statistics.fmean(r["retrieval"][lang] for r in chosen) for lang in languages]
        lines.append(f"| {negatives} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table)
    print(table, flush=True)

    from trl_midalign.probing.plots import pyplot as _pyplot

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for (name, points), color, base_value in zip(curve.items(), ("C0", "C1"), b):
        xs = [p[0] for p in points]
        axis.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, color=color,
                      label=f"{name} languages")  # fmt: skip
        axis.axhline(base_value, color=color, linestyle="--", linewidth=0.8, label=f"{name}, base model")
    axis.set_xscale("log", base=2)
    axis.set_xticks(xs, [str(x) for x in xs])
    axis.set(xlabel="pairs per alignment step (in-batch candidates)", ylabel=f"retrieval accuracy, layer {args.align_layer}",
             title=f"Gemma 3 270M, {args.max_steps} steps, mean +- sd over seeds")  # fmt: skip
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(args.output_dir, "negatives.png"), dpi=120)
    plt.close(figure)


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    if args.report_only:
        report(args)
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_midalign.demo import gemma3_270m, libreoffice_parallel_pairs

    start = time.time()
    languages = args.train_languages + args.unseen_languages
    model_dir = gemma3_270m()
    pairs = libreoffice_parallel_pairs(languages, seed=0, max_chars=args.max_chars)
    train_pairs, eval_pairs = split(pairs, languages, args.eval_pairs_per_language)
    train_pairs = train_pairs.filter(lambda row: row["language"] in args.train_languages)
    log(f"{len(train_pairs)} training pairs ({args.train_languages}), {len(eval_pairs)} held-out pairs ({languages})")

    path = os.path.join(args.output_dir, "results.jsonl")

    def claim(negatives, seed) -> bool:
        """Several workers may share the grid (one process per core): each run is claimed by creating a file."""
        try:
            os.close(os.open(os.path.join(args.output_dir, f"claim-{negatives}-{seed}"), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    if claim(0, None):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        scores = retrieval_at_layer(model, AutoTokenizer.from_pretrained(model_dir), eval_pairs, args.align_layer,
                                    args.max_length)  # fmt: skip
        with open(path, "a") as f:
            f.write(json.dumps({"negatives": 0, "seed": None, "retrieval": scores}) + "\n")
        log(f"base model: {scores}")
    # Largest arm first, seed-major: an interrupted grid still has every arm for the first seeds
    for seed in args.seeds:
        for negatives in sorted(args.negatives, reverse=True):
            if not claim(negatives, seed):
                continue
            result = train_once(args, model_dir, train_pairs, eval_pairs, negatives, seed)
            with open(path, "a") as f:
                f.write(json.dumps(result) + "\n")
            log(
                f"{negatives} pairs/step, seed {seed}: trained {group_mean(result['retrieval'], args.train_languages):.3f}"
                f", unseen {group_mean(result['retrieval'], args.unseen_languages):.3f} (train "
                f"{result['train_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s; load {os.getloadavg()[0]:.1f})"
            )
    log(f"this worker is done after {(time.time() - start) / 60:.1f} min")
    with open(path) as f:
        finished = sum(1 for line in f if line.strip())
    if finished == 1 + len(args.negatives) * len(args.seeds):
        report(args)


if __name__ == "__main__":
    main(parse_args())
