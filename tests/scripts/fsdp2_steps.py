"""Launched by tests/test_distributed.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

accelerate never enables FSDP on CPU, so this script shards a copy of a tiny Llama the way accelerate's FSDP2
transformer-based wrap does (`fully_shard` on every decoder block, then on the root) and runs AlignmentTrainer's
`compute_loss` + backward + an optimizer step on it, micro-step by micro-step, next to the same steps on the unsharded
model (whose gradients are averaged across the ranks by hand, as FSDP's reduce-scatter does). Each rank writes the
largest loss, gradient and weight differences it saw.

Variants: `plain`; `checkpointing` (gradient checkpointing on both models); `gather` (align_gather_negatives: the
pooled pairs of both ranks are the candidates of each, on both models); `gather_cached` (the same with gradient
caching, `align_mini_batch_size=1`: each pair re-run in its own FSDP2 forward inside the backward).

Usage: PYTHONPATH=<repo>/tests:<repo> fsdp2_steps.py OUTPUT_DIR SCHEDULE {plain,checkpointing,gather,gather_cached}
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from testing_utils import alignment_config, build_model, build_tokenizer, task_rows
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from trl_midalign import AlignmentTrainer
from trl_midalign.schedules import is_alignment_step
from trl_midalign.scripts import end_processes


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(output_dir: str, schedule: str, variant: str) -> None:
    tokenizer = build_tokenizer()
    reference = build_model("llama", len(tokenizer), num_layers=4)
    if variant == "checkpointing":
        reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    args = alignment_config(
        output_dir,
        per_device_train_batch_size=2,
        align_schedule=schedule,
        align_layer=2,
        ddp_timeout=300,  # a rank waiting for a collective fails after 5 minutes instead of hanging
        align_gather_negatives=variant in ("gather", "gather_cached"),
        align_mini_batch_size=1 if variant == "gather_cached" else None,
    )
    dataset = Dataset.from_list(task_rows(n=16))
    trainer = AlignmentTrainer(model=reference, args=args, train_dataset=dataset, processing_class=tokenizer)
    # The same initial weights, set up by a trainer of its own (SFTTrainer adds TRL's fused LM head as a closure
    # over the model's forward, so a deepcopy of `trainer.model` would still run the original's forward)
    sharded = build_model("llama", len(tokenizer), num_layers=4)
    if variant == "checkpointing":
        sharded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    AlignmentTrainer(model=sharded, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert all(torch.equal(p, q) for p, q in zip(reference.state_dict().values(), sharded.state_dict().values()))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world

    mesh = init_device_mesh("cpu", (world,))
    for block in sharded.model.layers:  # accelerate's transformer-based wrap: each decoder block, then the root
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    reference.train()
    sharded.train()
    optimizers = {
        "reference": torch.optim.SGD(reference.parameters(), lr=0.5),
        "sharded": torch.optim.SGD(sharded.parameters(), lr=0.5),
    }

    worst = {"loss": 0.0, "grad": 0.0, "weight": 0.0, "largest_grad": 0.0}
    losses, gathered_differs = [], []
    batches = iter(trainer.get_train_dataloader())
    for micro_step in range(4):
        batch = next(batches)
        step_losses = {}
        for name, model in (("reference", reference), ("sharded", sharded)):
            trainer._align_micro_step = micro_step  # the same phase of the schedule for both models
            loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
            step_losses[name] = loss.item()
        if args.align_gather_negatives and is_alignment_step(schedule, micro_step):
            # Control: the same batch without gathering (and without caching) gives another loss
            args.align_gather_negatives, args.align_mini_batch_size = False, None
            with torch.no_grad():
                trainer._align_micro_step = micro_step
                local = trainer.compute_loss(reference, dict(batch)).item()
            args.align_gather_negatives = variant in ("gather", "gather_cached")
            args.align_mini_batch_size = 1 if variant == "gather_cached" else None
            gathered_differs.append(abs(local - step_losses["reference"]) > 1e-4)
        for param in reference.parameters():  # DDP/FSDP average the gradients of the ranks
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= world
        for (name, ref), (_, shard) in zip(reference.named_parameters(), sharded.named_parameters()):
            if ref.grad is None:
                assert shard.grad is None or full(shard.grad).abs().max().item() == 0.0, name
                continue
            worst["grad"] = max(worst["grad"], (full(shard.grad) - ref.grad).abs().max().item())
            worst["largest_grad"] = max(worst["largest_grad"], ref.grad.abs().max().item())
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for ref, shard in zip(reference.parameters(), sharded.parameters()):
            worst["weight"] = max(worst["weight"], (full(shard.detach()) - ref.detach()).abs().max().item())
        worst["loss"] = max(worst["loss"], abs(step_losses["reference"] - step_losses["sharded"]))
        losses.append(step_losses)

    changed = any(
        not torch.equal(full(p.detach()), q.detach())
        for p, q in zip(sharded.parameters(), build_model("llama", len(tokenizer), num_layers=4).parameters())
    )
    result = {"rank": rank, "world_size": world, "worst": worst, "losses": losses, "changed": changed,
              "gathered_differs": gathered_differs,
              "sharded": all(hasattr(p, "full_tensor") for p in sharded.parameters())}  # fmt: skip
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # As the recipes end: a barrier, the group destroyed, a pause (a rank ending right after a collective can abort)
    end_processes(trainer)


if __name__ == "__main__":
    main(*sys.argv[1:4])
