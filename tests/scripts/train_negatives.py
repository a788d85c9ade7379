"""Trains a tiny LoRA Llama on alignment pairs with AlignmentTrainer (alignment_only, SGD) and writes, per process, the
trained LoRA weights and the log history. Launched by tests/test_negatives.py as one process and under
`accelerate launch --num_processes 2 --multi_gpu` (DDP on CPU), to compare runs with gathered negatives and gradient
caching against one process holding the whole batch.

    python train_negatives.py OUTPUT_DIR '{"per_device_train_batch_size": 4, "align_gather_negatives": true}'
"""

import contextlib
import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from testing_utils import PAIRS, alignment_config, build_model, build_tokenizer, task_rows

from trl_midalign import AlignmentTrainer
from trl_midalign.scripts import end_processes


def pairs(n: int = 24) -> Dataset:
    """`n` distinct pairs: the toy pairs, then the same with a number appended."""
    rows = []
    for i in range(n):
        source, target = PAIRS[i % len(PAIRS)]
        suffix = "" if i < len(PAIRS) else f" {i}"
        rows.append({"parallel_source": source + suffix, "parallel_target": target + suffix})
    return Dataset.from_list(rows)


def gathered(model):
    """Gather ZeRO-3 partitioned parameters for reading; a no-op otherwise."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def main(output_dir: str, overrides: dict) -> None:
    tokenizer = build_tokenizer()
    model = build_model("llama", len(tokenizer), num_layers=4)
    settings = dict(
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        align_schedule="alignment_only",
        align_layer=2,
    )
    settings.update(overrides)
    # Alignment-only: the pairs are the training data; other schedules: task rows, with the pairs attached in turn
    task = (
        None
        if settings["align_schedule"] == "alignment_only"
        else Dataset.from_list(task_rows(n=24, with_pairs=False))
    )
    trainer = AlignmentTrainer(
        model=model,
        args=alignment_config(output_dir, **settings),
        train_dataset=task,
        alignment_dataset=pairs(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    with gathered(unwrapped):  # ZeRO-3 keeps only a shard of each parameter on each rank
        weights = {
            n: p.detach().float().flatten().tolist() for n, p in unwrapped.named_parameters() if p.requires_grad
        }
    rank = trainer.accelerator.process_index
    result = {
        "zero3_partitioned": any(p.numel() == 0 for p in unwrapped.parameters()),  # only shards outside a gather
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "weights": weights,
        "log_history": trainer.state.log_history,
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    end_processes(trainer)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
