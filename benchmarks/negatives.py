"""Peak memory and time of one alignment step (forward + backward, through AlignmentTrainer.compute_loss) with more pairs
than a device holds, by gradient caching (`align_mini_batch_size`).

Cases (each in a fresh subprocess, so that its peak memory is its own; memory is the increase over the process after
setup: peak resident memory on CPU, peak allocated memory on CUDA):
- small:        `--mini` pairs (default 8), uncached: the step a memory-bound user runs today;
- large:        `--pairs` pairs (default 64), uncached: what the large batch costs without caching;
- large_cached: `--pairs` pairs in mini-batches of `--mini` (gradient caching).

On CPU, glibc keeps freed heap memory mapped, so the peak resident memory of a process that allocates and frees
mini-batch after mini-batch overstates what is live at once; each case therefore runs with `MALLOC_MMAP_THRESHOLD_`
(default 64 KiB: tensors above it are mapped and unmapped on their own), which makes the resident peak track live
memory but slows allocation (times are then pessimistic). `--malloc_mmap_threshold 0` keeps glibc's default.

    OMP_NUM_THREADS=1 python benchmarks/negatives.py                 # tiny Llama on CPU (12 blocks, hidden 256, L = 6)
    python benchmarks/negatives.py --device cuda --dtype bfloat16 --layers 32 --hidden 4096 --kv_heads 8 ...
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


CASES = ("small", "large", "large_cached")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="decoder blocks N")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--kv_heads", type=int, default=None, help="key/value heads (default: heads)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--align_layer", type=int, default=None, help="aligned layer L (default N // 2)")
    parser.add_argument("--pairs", type=int, default=64, help="pairs of the large alignment step")
    parser.add_argument("--mini", type=int, default=8, help="pairs of the small step = align_mini_batch_size")
    parser.add_argument("--pair_tokens", type=int, default=64, help="tokens per parallel sentence")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument(
        "--malloc_mmap_threshold", type=int, default=65536, help="bytes; 0 keeps glibc's default (see above)"
    )
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case and print JSON
    return parser.parse_args(argv)


def run_case(args) -> dict:
    import torch
    from _common import measure_step
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from trl_midalign import AlignmentConfig, AlignmentTrainer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.pair_tokens + 8,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    # A word-level tokenizer whose "words" are token numbers: sentences of exactly the requested length
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{str(i): i for i in range(3, args.vocab)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    generator = torch.Generator().manual_seed(0)

    def sentence():
        return " ".join(str(int(t)) for t in torch.randint(3, args.vocab, (args.pair_tokens,), generator=generator))

    pairs = args.mini if args.case == "small" else args.pairs
    rows = [{"parallel_source": sentence(), "parallel_target": sentence()} for _ in range(pairs)]
    training_args = AlignmentConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=pairs,
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        align_max_length=args.pair_tokens,
        align_layer=args.align_layer or args.layers // 2,
        align_schedule="alignment_only",
        align_mini_batch_size=args.mini if args.case == "large_cached" else None,
    )
    trainer = AlignmentTrainer(
        model=model,
        args=training_args,
        train_dataset=None,
        alignment_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    model = trainer.model.to(args.device)
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)])
    batch = {k: v.to(args.device) for k, v in batch.items()}

    def step():
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not activation memory

    for p in model.parameters():  # allocate gradient buffers before the baseline
        p.grad = torch.zeros_like(p)
    median_s, peak_mb = measure_step(step, args.repeats, args.device)
    return {
        "case": args.case,
        "pairs": pairs,
        "median_s": median_s,
        "peak_mem_mb": peak_mb,
        "pair_tokens": int(batch["align_attention_mask"].sum()),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    results = {}
    for case in CASES:
        command = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
        env = dict(os.environ)
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        output = subprocess.run(command + ["--case", case], capture_output=True, text=True, check=True, env=env).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
    print(
        f"Llama N={args.layers} blocks, hidden {args.hidden}, L={args.align_layer or args.layers // 2}, "
        f"{args.pair_tokens} tokens per sentence, {args.device} {args.dtype}, median of {args.repeats}, "
        f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'glibc default'}"
    )
    print(f"{'step':<34}{'time (ms)':>12}{'peak mem (MB)':>16}")
    names = {
        "small": f"{args.mini} pairs",
        "large": f"{args.pairs} pairs",
        "large_cached": f"{args.pairs} pairs, mini-batches of {args.mini}",
    }
    for case, r in results.items():
        print(f"{names[case]:<34}{r['median_s'] * 1e3:>12.1f}{r['peak_mem_mb']:>16.1f}")
    small, large, cached = results["small"], results["large"], results["large_cached"]
    print(
        f"cached {args.pairs} / uncached {args.mini}: memory {cached['peak_mem_mb'] / small['peak_mem_mb']:.2f}x; "
        f"cached / uncached {args.pairs}: memory {cached['peak_mem_mb'] / large['peak_mem_mb']:.2f}x, time "
        f"{cached['median_s'] / large['median_s']:.2f}x (the second forward)"
    )


if __name__ == "__main__":
    main()
