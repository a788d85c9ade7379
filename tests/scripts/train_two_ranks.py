"""Launched by tests/test_distributed.py under `accelerate launch --num_processes 2`: trains a tiny LoRA model with
AlignmentTrainer and writes, per rank, a checksum of every parameter and the logged losses."""

import contextlib
import hashlib
import json
import os
import sys

import torch


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "recipes"))

from _common import end_processes  # noqa: E402
from conftest import build_model, build_tokenizer, task_rows  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

from trl_midalign import AlignmentConfig, AlignmentTrainer  # noqa: E402


def gathered(model):
    """Gather ZeRO-3 partitioned parameters for reading; a no-op otherwise."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def main(output_dir: str, schedule: str) -> None:
    tokenizer = build_tokenizer()
    model = build_model("llama", len(tokenizer), num_layers=4)
    args = AlignmentConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=1,
        learning_rate=5e-3,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
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
    with gathered(trainer.model):  # ZeRO-3 keeps only a shard of each parameter on each rank
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    partitioned = any(p.numel() == 0 for p in unwrapped.parameters())  # only shards are held outside a gather
    digest = hashlib.sha256()
    changed = []
    with gathered(unwrapped):
        for name, param in sorted(unwrapped.named_parameters()):
            if not param.requires_grad:
                continue
            data = param.detach().float().cpu().contiguous()
            digest.update(name.encode() + data.numpy().tobytes())
            if not torch.equal(before[name].float().cpu(), data):
                changed.append(name)
    rank = trainer.accelerator.process_index
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "checksum": digest.hexdigest(),
        "changed": changed,
        "zero3_partitioned": partitioned,
        "log_history": trainer.state.log_history,
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    end_processes(trainer)  # as the recipes end: a process ending right after a collective can abort at exit


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
