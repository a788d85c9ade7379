"""How far an alignment step of the alternate schedule moves each decoder block, compared with the task step before it.

The alternate schedule (the paper's) makes every second micro-batch an optimizer step on the alignment loss alone.
With Adam, a step moves a parameter by its momentum, which still holds the task gradients of the steps before; the
alignment step therefore also applies part of the last task update again to every block that gets a gradient (the
blocks below the aligned layer), however small the alignment loss is. This script measures it on Gemma 3 270M (LoRA
r=8 on all linear layers, the recipes' learning rate 1e-3, aligned layer 12) with `align_weight` 1 and 1e-6: the norm of
each step's change of the LoRA weights, summed over the blocks below the aligned layer and over the blocks at and above.

    python experiments/schedule_momentum/schedule_momentum.py                  # 3.5 minutes on 2 CPU cores shared with other jobs
    python experiments/schedule_momentum/schedule_momentum.py --steps 12 --align_weights 1 0.1 1e-6
"""

import argparse
import json
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from trl_midalign import AlignmentConfig, AlignmentTrainer
from trl_midalign.demo import gemma3_270m, libreoffice_parallel_pairs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: Gemma 3 270M)")
    parser.add_argument("--align_layer", type=int, default=12)
    parser.add_argument("--align_weights", type=float, nargs="+", default=[1.0, 1e-6])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (half of them alignment steps)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=4)
    return parser.parse_args(argv)


class _UpdateNorms(TrainerCallback):
    """After every optimizer step: the norm of the step's change of the trainable weights, per decoder block."""

    def __init__(self):
        self.previous, self.steps = None, []

    def _weights(self, model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.previous = self._weights(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        current, per_block = self._weights(model), {}
        for name, value in current.items():
            block = int(name.split("layers.")[1].split(".")[0])
            per_block[block] = per_block.get(block, 0.0) + (value - self.previous[name]).pow(2).sum().item()
        self.steps.append({block: total**0.5 for block, total in per_block.items()})
        self.previous = current


def measure(args, model_path: str, rows: list[dict], align_weight: float) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as output_dir:
        config = AlignmentConfig(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, lr_scheduler_type="constant", align_layer=str(args.align_layer),
            align_weight=align_weight, align_schedule="alternate", align_max_length=64, max_length=96,
            use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        )  # fmt: skip
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        norms = _UpdateNorms()
        trainer = AlignmentTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            peft_config=peft_config, callbacks=[norms],
        )  # fmt: skip
        trainer.train()
    results = []
    for step, per_block in enumerate(norms.steps, start=1):
        below = sum(v**2 for b, v in per_block.items() if b < args.align_layer) ** 0.5
        above = sum(v**2 for b, v in per_block.items() if b >= args.align_layer) ** 0.5
        results.append({"step": step, "kind": "task" if step % 2 else "alignment", "below": below, "above": above})
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    model_path = args.model or gemma3_270m()
    pairs = libreoffice_parallel_pairs(
        ["ja", "ru"], max_pairs_per_language=args.steps * args.batch_size, max_chars=120
    )
    # A task row per pair: repeat the English paragraph (any task would do; what is measured is the optimizer)
    rows = [
        {"prompt": f"Repeat: {pair['parallel_target']}\n", "completion": pair["parallel_target"], **pair}
        for pair in pairs
    ]
    report = {}
    for weight in args.align_weights:
        steps = measure(args, model_path, rows, weight)
        print(f"align_weight {weight}: change of the LoRA weights per step (blocks < {args.align_layer} / >=)")
        for row in steps:
            print(f"  step {row['step']:2d} {row['kind']:9s} below {row['below']:.4f}  above {row['above']:.4f}")
        task_below = [r["below"] for r in steps if r["kind"] == "task"]
        align_below = [r["below"] for r in steps if r["kind"] == "alignment"]
        ratios = [a / t for a, t in zip(align_below, task_below) if t > 0]
        print(f"  alignment step / task step before it, blocks below: {[round(r, 2) for r in ratios]}")
        report[str(weight)] = {"steps": steps, "ratio_below": ratios}
    print(json.dumps({"align_layer": args.align_layer, "learning_rate": args.learning_rate, "runs": report}))
    return report


if __name__ == "__main__":
    main()
