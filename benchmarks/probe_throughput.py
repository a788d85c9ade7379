"""Throughput of `probe_layers` on CPU with Gemma 3 270M and real LibreOffice parallel text.

The target (issue 3): 200 pairs x 6 languages within 3 minutes on 2 CPU cores.

    python benchmarks/probe_throughput.py                      # 200 pairs x 6 languages, 2 threads
    python benchmarks/probe_throughput.py --batch_sizes 16 32 64 --pairs_per_language 50

The first run converts the model and downloads the Debian help packages (cached under ~/.cache/trl_midalign).
Timings exclude loading; each batch size is timed on a freshly loaded model after one warm-up batch.
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_midalign.demo import gemma3_270m, libreoffice_parallel_pairs
from trl_midalign.probing import probe_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--languages", nargs="+", default=["de", "fr", "ja", "hi", "ru", "zh-cn"])
    parser.add_argument("--pairs_per_language", type=int, default=200)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    parser.add_argument("--budget_s", type=float, default=180.0, help="time limit to check against")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pairs = libreoffice_parallel_pairs(args.languages, max_pairs_per_language=args.pairs_per_language, seed=0)
    model_dir = gemma3_270m()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    num_pairs = len(pairs)
    sentences = len(set(pairs["parallel_source"]) | set(pairs["parallel_target"]))
    lengths = [len(ids) for ids in tokenizer([*pairs["parallel_source"], *pairs["parallel_target"]])["input_ids"]]
    tokens = sum(min(n, args.max_length) for n in lengths)
    print(
        f"Gemma 3 270M, {num_pairs} pairs ({len(args.languages)} languages x {args.pairs_per_language}), "
        f"{sentences} distinct sentences, {tokens} tokens, {args.threads} threads, torch {torch.__version__}"
    )
    probe_layers(model, tokenizer, pairs.select(range(4)), batch_size=8, show_progress=False)  # warm-up

    for batch_size in args.batch_sizes:
        load_before = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        result = probe_layers(model, tokenizer, pairs, batch_size=batch_size, max_length=args.max_length)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        verdict = "within" if seconds <= args.budget_s else "OVER"
        # On a shared machine the wall time depends on the other processes: the CPU time of this process (divided
        # by the thread count) is what the run would take with the cores to itself.
        print(
            f"batch_size={batch_size}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU "
            f"(load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores), "
            f"{num_pairs / seconds:.1f} pairs/s, {tokens / seconds:.0f} tokens/s "
            f"({verdict} the {args.budget_s:.0f} s budget); "
            f"recommended layer {result.recommended_layer}, mean retrieval there "
            f"{result.retrieval_accuracy['mean'][result.recommended_layer]:.3f}"
        )
    print(result.to_markdown())


if __name__ == "__main__":
    main()
