"""Launched by tests/test_negatives.py under `python -m torch.distributed.run --nproc_per_node 2`: each rank embeds its
share of a batch of real pairs with a tiny Llama, takes the contrastive loss with `gather_across_devices=True` and
back-propagates; the same script computes the single-process reference on the concatenated batch. Writes, per rank,
the losses and the gradient differences as JSON (the test asserts on them)."""

import json
import os
import sys

import torch
import torch.distributed as dist
from testing_utils import PAIRS, build_model, build_tokenizer

from trl_midalign import DataCollatorForAlignment, contrastive_alignment_loss, layer_hidden_states
from trl_midalign.losses import masked_mean_pool
from trl_midalign.scripts import end_processes


LAYER = 2


def pooled(model, batch):
    states = layer_hidden_states(model, batch["align_input_ids"], batch["align_attention_mask"], LAYER)
    return masked_mean_pool(states, batch["align_attention_mask"]).chunk(2)


def grads(model):
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}


def run_case(tokenizer, rows_per_rank, directions, stop_gradient, rank, world_size):
    collator = DataCollatorForAlignment(tokenizer)
    rows = [{"parallel_source": s, "parallel_target": t} for s, t in PAIRS]
    # A duplicate across processes: the first pair of rank 1 repeats the English side of rank 0's second pair
    rows[rows_per_rank[0]] = {"parallel_source": "Licht aus bitte", "parallel_target": rows[1]["parallel_target"]}
    bounds = [sum(rows_per_rank[:r]) for r in range(world_size + 1)]
    everything = rows[: bounds[-1]]
    settings = dict(temperature=0.1, directions=directions, stop_gradient=stop_gradient)

    # This process: its own rows, gathered negatives
    model = build_model("llama", len(tokenizer))
    local = collator(everything[bounds[rank] : bounds[rank + 1]])
    source, target = pooled(model, local)
    loss = contrastive_alignment_loss(
        source, target, pair_ids=local["align_pair_ids"], gather_across_devices=True, **settings
    )
    loss.backward()
    local_grads = grads(model)
    summed = {}
    for name, grad in local_grads.items():
        summed[name] = grad.clone()
        dist.all_reduce(summed[name])
    losses = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(losses, loss.detach().reshape(1))

    # Reference: one process holding the concatenated batch (same initial weights: same seed)
    reference = build_model("llama", len(tokenizer))
    full = collator(everything)
    full_source, full_target = pooled(reference, full)
    full_loss = contrastive_alignment_loss(
        full_source, full_target, same_pair_mask=full["align_same_pair"], **settings
    )
    full_loss.backward()
    reference_grads = grads(reference)
    # The reference loss of this process's rows alone (its rows scored against the whole concatenated batch)
    with torch.no_grad():
        scores = (
            torch.nn.functional.normalize(full_source.float(), dim=-1)
            @ torch.nn.functional.normalize(full_target.float(), dim=-1).T
            / 0.1
        )
        scores = scores.masked_fill(full["align_same_pair"] & ~torch.eye(len(everything), dtype=torch.bool), -1e9)
        per_row = torch.nn.functional.cross_entropy(scores, torch.arange(len(everything)), reduction="none")
        if directions == "both":
            per_row = (per_row + torch.nn.functional.cross_entropy(scores.T, torch.arange(len(everything)),
                                                                   reduction="none")) / 2  # fmt: skip
        own_rows = per_row[bounds[rank] : bounds[rank + 1]].mean().item()
    unmasked = contrastive_alignment_loss(full_source.detach(), full_target.detach(), **settings).item()

    def max_difference(a, b):
        return max((a[name] - b[name]).abs().max().item() for name in b)

    return {
        "rows_per_rank": rows_per_rank,
        "directions": directions,
        "stop_gradient": stop_gradient,
        "loss": loss.item(),
        "losses_of_all_ranks": [value.item() for value in losses],
        "reference_loss": full_loss.item(),
        "reference_loss_of_own_rows": own_rows,
        "reference_loss_without_duplicate_mask": unmasked,
        "same_parameters_with_gradients": sorted(summed) == sorted(reference_grads),
        "max_abs_reference_gradient": max(g.abs().max().item() for g in reference_grads.values()),
        "averaged_gradient_difference": max_difference(
            {n: g / world_size for n, g in summed.items()}, reference_grads
        ),
        "summed_gradient_difference": max_difference(summed, reference_grads),
        "local_gradient_difference": max_difference(local_grads, reference_grads),
    }


def main(output_dir):
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokenizer = build_tokenizer()
    cases = [
        run_case(tokenizer, [3, 3], "source_to_target", None, rank, world_size),
        run_case(tokenizer, [3, 3], "both", None, rank, world_size),
        run_case(tokenizer, [3, 3], "source_to_target", "target", rank, world_size),
        run_case(tokenizer, [4, 2], "source_to_target", None, rank, world_size),  # a short batch on rank 1
    ]
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": world_size, "cases": cases}, f)
    end_processes()  # a barrier, the group destroyed, a pause: a rank ending right after a collective can abort at exit


if __name__ == "__main__":
    main(sys.argv[1])
