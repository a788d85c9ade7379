"""Time and peak memory of one task micro-batch (forward + backward) on prompt-completion rows: plain `trl.SFTTrainer`
against `AlignmentTrainer`, whose task loss projects only the label positions (`lm_head_on_labels_only`).

Cases, each in a fresh subprocess (so that its peak memory is its own), LoRA r=8 on every linear layer:
- sft:          `trl.SFTTrainer.compute_loss` (TRL's fused LM head; on the CPU it projects every position);
- trl_head:     `AlignmentTrainer.compute_loss` with `lm_head_on_labels_only=False` (TRL's head through our trainer);
- labels_only:  `AlignmentTrainer.compute_loss` with the default, the LM head on the label positions only.

On the CPU the times are the process's CPU time (`time.process_time`; run with `OMP_NUM_THREADS=1`, so that it is the
step's work, which other jobs on the 2 cores change little); on CUDA wall time. Rows are pre-tokenized (`input_ids`
and `completion_mask`, as TRL accepts them), `--tokens` long, of which the last `--completion` share is the completion
(the label positions, with `completion_only_loss`).

    python benchmarks/task_step.py --model tiny --completion 0.1 0.2 0.3   # Llama, 12 blocks, hidden 256, vocab 32000
    python benchmarks/task_step.py --model gemma --completion 0.2          # Gemma 3 270M (vocabulary 262,144)
    python benchmarks/task_step.py --model llama8b --device cuda --dtype bfloat16 --batch 4 --tokens 1024
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


CASES = ("sft", "trl_head", "labels_only")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", choices=["tiny", "gemma", "llama8b"], default="tiny", help="llama8b: random weights"
    )
    parser.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per row")
    parser.add_argument("--completion", type=float, nargs="+", default=[0.2], help="completion share(s) of a row")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--liger", action="store_true", help="also plain SFTTrainer with use_liger_kernel=True")
    parser.add_argument("--case", choices=CASES + ("sft_liger",), help=argparse.SUPPRESS)  # internal: one case
    parser.add_argument("--share", type=float, help=argparse.SUPPRESS)  # internal: the case's completion share
    return parser.parse_args(argv)


def build_model(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model == "gemma":
        from trl_midalign.demo import gemma3_270m

        return AutoModelForCausalLM.from_pretrained(gemma3_270m(), dtype=dtype)
    if args.model == "llama8b":  # Llama-3-8B's shape, random weights
        config = LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        )  # fmt: skip
    else:
        config = LlamaConfig(
            vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=8,
            max_position_embeddings=1024,
        )  # fmt: skip
    with torch.device(args.device if args.device.startswith("cuda") else "cpu"):
        return LlamaForCausalLM(config).to(dtype)


def run_case(args) -> dict:
    import torch
    from _common import measure_step
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from trl_midalign import AlignmentConfig, AlignmentTrainer

    torch.manual_seed(0)
    model = build_model(args)
    vocab = model.config.vocab_size
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2}, unk_token="<pad>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    generator = torch.Generator().manual_seed(0)
    completion = max(1, round(args.tokens * args.share))
    rows = []
    for i in range(args.batch):
        length = args.tokens - 4 * i  # rows of different lengths, as a real batch has: padding, shifted completions
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows.append({
            "input_ids": ids, "completion_mask": [0] * (length - completion) + [1] * completion,
            "parallel_source": f"source {i}", "parallel_target": f"target {i}",
        })  # fmt: skip
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, report_to="none",
        use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", max_length=None, dataset_num_proc=None,
        use_liger_kernel=args.case == "sft_liger", completion_only_loss=True,
    )  # fmt: skip
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    if args.case.startswith("sft"):
        plain = [{k: r[k] for k in ("input_ids", "completion_mask")} for r in rows]
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=Dataset.from_list(plain), processing_class=tokenizer,
            peft_config=peft_config,
        )  # fmt: skip
    else:
        config = AlignmentConfig(**common, align_layer=1, lm_head_on_labels_only=args.case == "labels_only")
        trainer = AlignmentTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            peft_config=peft_config,
        )  # fmt: skip
    model = trainer.model.to(args.device)
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    batch = {k: v.to(args.device) for k, v in batch.items()}
    labels = int(batch["labels"][:, 1:].ne(-100).sum())

    def step():
        if hasattr(trainer, "_align_micro_step"):
            trainer._align_micro_step = 0  # a task micro-batch of the alternate schedule
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        model.zero_grad(set_to_none=True)

    median_s, peak_mb = measure_step(step, args.repeats, args.device, cpu_time=True)
    return {
        "case": args.case, "share": args.share, "median_s": median_s, "peak_mem_mb": peak_mb,
        "tokens": int(batch["attention_mask"].sum()), "positions": batch["input_ids"].numel(), "labels": labels,
    }  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    cases = CASES + (("sft_liger",) if args.liger else ())
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    print(
        f"model {args.model}, batch {args.batch} rows of {args.tokens - 4 * (args.batch - 1)}-{args.tokens} tokens, "
        f"LoRA r=8 all-linear, {args.device} {args.dtype}, {os.environ.get('OMP_NUM_THREADS', 'all')} threads, "
        f"median of {args.repeats} forward+backward ({'wall' if args.device.startswith('cuda') else 'CPU'} time)"
    )
    print(f"{'completion':>10} {'case':<12}{'time (ms)':>11}{'peak (MB)':>11}{'labels':>8}{'vs sft':>8}")
    for share in args.completion:
        results = {}
        for case in cases:
            command = [sys.executable, os.path.abspath(__file__), *base, "--case", case, "--share", str(share)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"{share:>10.2f} {case:<12} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
        sft = results.get("sft")
        for case, r in results.items():
            ratio = f"{r['median_s'] / sft['median_s']:.2f}x" if sft else "-"
            print(
                f"{share:>10.2f} {case:<12}{r['median_s'] * 1e3:>11.1f}{r['peak_mem_mb']:>11.1f}{r['labels']:>8}"
                f"{ratio:>8}"
            )


if __name__ == "__main__":
    main()
