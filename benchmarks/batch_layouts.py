"""Padded vs padding-free vs packed task batches: task tokens per second and the share of compute spent on padding.

Trains a tiny Llama with AlignmentTrainer (alternate schedule) on rows whose lengths are those of real LibreOffice help
paragraphs (English, counted with Gemma 3's tokenizer; taken from the trl-midalign cache, so run `trl-midalign demo`
once first), with random token ids of those lengths. For each layout it reports the real task tokens processed per
second of training (the alignment steps included, as in a real run) and the fraction of the task batches' token slots
that are padding.

    python benchmarks/batch_layouts.py                  # tiny Llama on CPU, 3 layouts
    python benchmarks/batch_layouts.py --steps 40 --batch 8 --max_length 512 --rows 4096
"""

import argparse
import json
import random
import statistics
import tempfile
import time


LAYOUTS = ("padded", "padding_free", "packed_bfd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048, help="task rows (paragraph lengths sampled from the help)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per layout (half task, half alignment)")
    parser.add_argument("--batch", type=int, default=16, help="rows (or packed rows) per micro-batch")
    parser.add_argument("--max_length", type=int, default=256, help="truncation length / packed row length")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per layout (median reported)")
    return parser.parse_args(argv)


def paragraph_lengths(n: int, seed: int = 0) -> list[int]:
    from transformers import AutoTokenizer

    from trl_midalign.demo import gemma3_270m, help_paragraphs

    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m())
    texts = list(help_paragraphs("en").values())
    random.Random(seed).shuffle(texts)
    return [len(ids) for ids in tokenizer(texts[:n], add_special_tokens=True)["input_ids"]]


def run(layout: str, lengths: list[int], args) -> dict:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from trl_midalign import AlignmentConfig, AlignmentTrainer

    rng = random.Random(0)
    words = [f"w{i}" for i in range(args.vocab - 8)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}, unk_token="<unk>")),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )  # fmt: skip
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rows = []
    for i, length in enumerate(lengths):
        ids = [rng.randrange(4, args.vocab - 4) for _ in range(length)]
        rows.append(
            {"input_ids": ids, "parallel_source": f"w{i} w{i + 1} w{i + 2}", "parallel_target": f"w{i + 3} w{i}"}
        )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=4, max_position_embeddings=4096,
                    pad_token_id=0, attn_implementation="sdpa")
    )  # fmt: skip
    options = {
        "padded": dict(max_length=args.max_length),
        "padding_free": dict(max_length=None, padding_free=True),
        "packed_bfd": dict(max_length=args.max_length, packing=True, packing_strategy="bfd"),
    }[layout]
    if layout == "padding_free":  # TRL does not truncate padding-free rows: truncate them here, as the others are
        rows = [{**row, "input_ids": row["input_ids"][: args.max_length]} for row in rows]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = AlignmentTrainer(
            model=model,
            args=AlignmentConfig(
                output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                learning_rate=1e-4, report_to="none", save_strategy="no", disable_tqdm=True, bf16=False,
                use_cpu=True, seed=0, logging_steps=args.steps, dataloader_drop_last=True, **options,
            ),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        )  # fmt: skip
        real = slots = 0
        loader = trainer.get_train_dataloader()
        task_batches = args.steps // 2 + args.steps % 2  # the alternate schedule: task, alignment, task, ...
        batches = (batch for _ in range(args.steps) for batch in loader)  # as many epochs as max_steps needs
        for index, batch in enumerate(batches):
            if index >= args.steps:
                break
            if index % 2 == 0:
                mask = batch.get("attention_mask")  # padding-free and packed batches have no padding (no mask)
                real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                slots += batch["input_ids"].numel()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"layout": layout, "seconds": seconds, "task_batches": task_batches, "real_tokens": real,
            "token_slots": slots, "padding_fraction": 1 - real / slots, "tokens_per_second": real / seconds,
            "rows_in_dataset": len(trainer.train_dataset)}  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    import torch

    lengths = paragraph_lengths(args.rows)
    print(f"paragraph lengths (Gemma 3 tokens): median {statistics.median(lengths)}, mean {statistics.mean(lengths):.1f}, "
          f"max {max(lengths)}, {sum(x > args.max_length for x in lengths)} over {args.max_length}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    results = []
    for layout in LAYOUTS:
        runs = [run(layout, lengths, args) for _ in range(args.repeats)]
        best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        results.append(best)
        print(json.dumps(best))
    base = results[0]["tokens_per_second"]
    print("\n| layout | task tokens/s | vs padded | padding share of task token slots | dataset rows |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['layout']} | {r['tokens_per_second']:.0f} | {r['tokens_per_second'] / base:.2f}x | "
              f"{r['padding_fraction']:.1%} | {r['rows_in_dataset']} |")  # fmt: skip


if __name__ == "__main__":
    main()
