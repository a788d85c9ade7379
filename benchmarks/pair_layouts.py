"""Time and peak memory of one alignment micro-batch (forward + backward), padded pairs against padding-free pairs
(`align_padding_free`), on real parallel LibreOffice help paragraphs (German-English, their real length spread).

Each alignment micro-batch holds `--pairs` pairs drawn in turn from the shuffled paragraphs of both languages (taken
from the trl-midalign cache: run `trl-midalign demo` once first; paragraphs left untranslated are skipped), tokenized
with Gemma 3's tokenizer and cut at `--max_length` tokens, as `AlignmentTrainer` collates them. Cases, each in a fresh subprocess (its peak memory its
own), LoRA r=8 on every linear layer below the aligned layer:
- padded:        the sentences right-padded to the longest of the micro-batch (`align_padding_free=False`);
- padding_free:  the sentences packed into rows of at most `--max_length` tokens, positions restarting per sentence.

The warm-up step uses the first micro-batch and each timed step the next one, so the median is over micro-batches of
the real length spread. On the CPU the time is the process's CPU time (run with `OMP_NUM_THREADS=1`); on CUDA wall
time.

    python benchmarks/pair_layouts.py --model tiny     # Llama, 12 blocks, hidden 256, Gemma 3's vocabulary, layer 6
    python benchmarks/pair_layouts.py --model gemma    # Gemma 3 270M, layer 12
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile


CASES = ("padded", "padding_free")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--pairs", type=int, default=32, help="pairs per alignment micro-batch")
    parser.add_argument("--max_length", type=int, default=128, help="align_max_length (tokens per sentence)")
    parser.add_argument("--repeats", type=int, default=5, help="timed micro-batches after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: one case
    return parser.parse_args(argv)


def parallel_rows(count: int, seed: int = 0) -> list[dict]:
    from trl_midalign.demo import help_paragraphs

    english, german = help_paragraphs("en"), help_paragraphs("de")
    keys = sorted(k for k in set(english) & set(german) if english[k] != german[k])  # untranslated ones align nothing
    random.Random(seed).shuffle(keys)
    return [{"parallel_source": german[k], "parallel_target": english[k]} for k in keys[:count]]


def run_case(args) -> dict:
    import torch
    from _common import measure_step
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trl_midalign import AlignmentConfig, AlignmentTrainer
    from trl_midalign.demo import gemma3_270m

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m())
    if args.model == "gemma":
        model, layer = AutoModelForCausalLM.from_pretrained(gemma3_270m(), dtype=dtype), 12
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=1024,
        )  # fmt: skip
        model, layer = LlamaForCausalLM(config).to(dtype), 6
    rows = parallel_rows(args.pairs * (args.repeats + 1))
    config = AlignmentConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.pairs, report_to="none",
        use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", align_schedule="alignment_only",
        align_layer=layer, align_max_length=args.max_length, align_padding_free=args.case == "padding_free",
        dataset_num_proc=None,
    )  # fmt: skip
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = AlignmentTrainer(
        model=model, args=config, train_dataset=None, alignment_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    model = trainer.model.to(args.device)
    model.train()
    batches = [{k: v.to(args.device) for k, v in batch.items()} for batch in trainer.get_train_dataloader()]
    position = iter(batches)

    def step():
        loss = trainer.compute_loss(model, dict(next(position)))
        loss.backward()
        model.zero_grad(set_to_none=True)

    median_s, peak_mb = measure_step(step, args.repeats, args.device, cpu_time=True)
    masks = [batch["align_attention_mask"] for batch in batches]
    return {
        "case": args.case, "median_s": median_s, "peak_mem_mb": peak_mb,
        "tokens": sum(int(mask.sum()) for mask in masks) / len(masks),
        "padded_slots": sum(mask.numel() for mask in masks) / len(masks),
    }  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for case in CASES:
        command = [sys.executable, os.path.abspath(__file__), "--case", case] + [
            token for name in ("model", "pairs", "max_length", "repeats", "device", "dtype")
            for token in (f"--{name}", str(getattr(args, name)))
        ]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=here).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
    padded = results["padded"]
    print(f"{args.model}, {args.pairs} pairs per micro-batch (German-English help paragraphs, cut at {args.max_length} "
          f"tokens): {padded['tokens']:.0f} real tokens in {padded['padded_slots']:.0f} padded slots per micro-batch")  # fmt: skip
    print("| case | time per micro-batch | vs padded | peak memory |")
    print("|---|---:|---:|---:|")
    for case, result in results.items():
        ratio = result["median_s"] / padded["median_s"]
        print(f"| {case} | {1000 * result['median_s']:.1f} ms | {ratio:.2f}x | {result['peak_mem_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
