"""Launched by tests/test_distributed.py under `accelerate launch --num_processes 2`: trains a tiny LoRA model with
AlignmentTrainer and writes, per rank, a checksum of every trainable parameter and the logged losses.

Run with `PYTHONPATH=<repo>/tests:<repo>` (the launching test sets it)."""

import json
import os
import sys

from datasets import Dataset
from peft import LoraConfig
from testing_utils import (
    alignment_config,
    build_model,
    build_tokenizer,
    changed_parameters,
    rank_checksum,
    task_rows,
    trainable_state,
    zero3_partitioned,
)

from trl_midalign import AlignmentTrainer
from trl_midalign.scripts import end_processes


def main(output_dir: str, schedule: str) -> None:
    tokenizer = build_tokenizer()
    model = build_model("llama", len(tokenizer), num_layers=4)
    args = alignment_config(
        output_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        align_schedule=schedule,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    trainer = AlignmentTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(task_rows(n=16)),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = trainable_state(trainer.model)  # gathered: ZeRO-3 keeps only a shard of each parameter on each rank
    trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    partitioned = zero3_partitioned(unwrapped)  # only shards are held outside a gather
    changed = changed_parameters(before, unwrapped)
    rank = trainer.accelerator.process_index
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "checksum": rank_checksum(unwrapped)["sha256"],
        "changed": changed,
        "zero3_partitioned": partitioned,
        "log_history": trainer.state.log_history,
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    end_processes(trainer)  # as the recipes end: a process ending right after a collective can abort at exit


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
