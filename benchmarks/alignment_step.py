"""Time and peak memory of one training micro-batch (forward + backward) of AlignmentTrainer's step kinds.

Cases, all through the trainer's own `compute_loss` except the last:
- task:        an SFT step on the task tokens (TRL's fused LM head), as in plain SFT;
- align:       an alignment step: the pair runs through blocks 0..L-1 only, no LM head;
- joint:       task + alignment in one step;
- align_full:  the same alignment loss taken from a full `output_hidden_states=True` forward (what a naive
               implementation, or the reference, pays).

Each case runs in a fresh subprocess, so that its peak resident memory (on CPU) or peak allocated memory (on CUDA)
belongs to that case alone; memory is reported as the increase over the process after setup.

    python benchmarks/alignment_step.py                      # tiny Llama on CPU (12 blocks, hidden 256, L = 6)
    python benchmarks/alignment_step.py --device cuda --dtype bfloat16 --layers 32 --hidden 4096 ...
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


CASES = ("task", "align", "joint", "align_full")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="decoder blocks N")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (default 4 x hidden)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--kv_heads", type=int, default=None, help="key/value heads (default: heads)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--align_layer", type=int, default=None, help="aligned layer L (default N // 2)")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch (pairs per micro-batch too)")
    parser.add_argument("--task_tokens", type=int, default=128, help="tokens per task row")
    parser.add_argument("--pair_tokens", type=int, default=32, help="tokens per parallel sentence")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after one warm-up step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case and print JSON
    return parser.parse_args(argv)


def run_case(args) -> dict:
    import torch
    from _common import measure_step
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from trl_midalign import AlignmentConfig, AlignmentTrainer, contrastive_alignment_loss, masked_mean_pool

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(args.task_tokens, args.pair_tokens) + 8,
    )
    model = LlamaForCausalLM(config).to(dtype)
    # A word-level tokenizer whose "words" are token numbers: sentences of exactly the requested length
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{str(i): i for i in range(3, args.vocab)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")

    generator = torch.Generator().manual_seed(0)

    def sentence(length):
        return " ".join(str(int(t)) for t in torch.randint(3, args.vocab, (length,), generator=generator))

    rows = [
        {
            "text": sentence(args.task_tokens - 1),  # + EOS
            "parallel_source": sentence(args.pair_tokens),
            "parallel_target": sentence(args.pair_tokens),
        }
        for _ in range(args.batch)
    ]
    training_args = AlignmentConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        max_length=args.task_tokens,
        align_max_length=args.pair_tokens,
        align_layer=args.align_layer or args.layers // 2,
        align_schedule="joint" if args.case == "joint" else "alternate",
        dataset_num_proc=None,
    )
    trainer = AlignmentTrainer(
        model=model, args=training_args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    model = trainer.model.to(args.device)
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    batch = {k: v.to(args.device) for k, v in batch.items()}
    layer = trainer.align_layer

    def step():
        inputs = dict(batch)
        if args.case == "align_full":
            pair_ids, pair_mask = inputs["align_input_ids"], inputs["align_attention_mask"]
            states = model(input_ids=pair_ids, attention_mask=pair_mask, output_hidden_states=True).hidden_states
            source, target = masked_mean_pool(states[layer], pair_mask).chunk(2)
            loss = contrastive_alignment_loss(source, target)
        else:
            trainer._align_micro_step = 1 if args.case == "align" else 0  # the phase picks the step kind
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)

    median_s, peak_mb = measure_step(step, args.repeats, args.device)
    pair_tokens = int(batch["align_attention_mask"].sum())
    task_tokens = int(batch["attention_mask"].sum())
    return {
        "case": args.case,
        "median_s": median_s,
        "peak_mem_mb": peak_mb,
        "task_tokens": task_tokens,
        "pair_tokens": pair_tokens,
        "layer": layer,
        "num_layers": args.layers,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    results = []
    for case in CASES:
        command = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
        output = subprocess.run(command + ["--case", case], capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    by_case = {r["case"]: r for r in results}
    first = results[0]
    print(
        f"Llama N={first['num_layers']} blocks, hidden {args.hidden}, L={first['layer']}, batch {args.batch}, "
        f"{args.task_tokens} task tokens, {args.pair_tokens} pair tokens, {args.device} {args.dtype}, "
        f"median of {args.repeats}"
    )
    print(f"{'step':<12}{'time (ms)':>12}{'peak mem (MB)':>16}{'tokens/s':>12}")
    for r in results:
        tokens = r["task_tokens"] if r["case"] == "task" else r["pair_tokens"]
        if r["case"] == "joint":
            tokens = r["task_tokens"] + r["pair_tokens"]
        print(f"{r['case']:<12}{r['median_s'] * 1e3:>12.1f}{r['peak_mem_mb']:>16.1f}{tokens / r['median_s']:>12.0f}")
    align, full = by_case["align"], by_case["align_full"]
    print(
        f"alignment step / full-forward alignment: time {align['median_s'] / full['median_s']:.2f}, memory "
        f"{align['peak_mem_mb'] / max(full['peak_mem_mb'], 1e-9):.2f} (L/N = {first['layer'] / first['num_layers']:.2f})"
    )
    extra = by_case["joint"]["median_s"] - by_case["task"]["median_s"]
    print(f"joint - task: {extra * 1e3:.1f} ms (alignment step alone: {align['median_s'] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
