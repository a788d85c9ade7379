"""More negatives per alignment step: gathered across processes, gradient caching, and alignment batches decoupled from
the task batch (docs/negatives.md)."""

import contextlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from testing_utils import PAIRS, build_model, free_port, task_rows

from trl_midalign import AlignmentConfig, AlignmentTrainer, DataCollatorForAlignment, contrastive_alignment_loss
from trl_midalign import losses as losses_module
from trl_midalign.losses import gradient_cached_loss


HERE = os.path.abspath(os.path.dirname(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(HERE, "scripts")


def run(command, tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([HERE, ROOT]),
    }
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


# ---------------------------------------------------------------------------------------------------------------------
# The loss: duplicate identities, gathering in one process


def test_pair_ids_mask_the_same_duplicates_as_same_pair_mask(tokenizer):
    rows = [{"parallel_source": s, "parallel_target": t} for s, t in PAIRS[:5]]
    rows.append({"parallel_source": "Licht aus", "parallel_target": PAIRS[3][1]})  # repeats the English of pair 3
    batch = DataCollatorForAlignment(tokenizer)(rows)
    assert batch["align_pair_ids"].shape == (6, 2)
    assert batch["align_pair_ids"][5, 1] == batch["align_pair_ids"][3, 1]
    assert batch["align_pair_ids"][5, 0] != batch["align_pair_ids"][3, 0]
    torch.manual_seed(0)
    source, target = torch.randn(6, 8), torch.randn(6, 8)
    by_ids = contrastive_alignment_loss(source, target, pair_ids=batch["align_pair_ids"], directions="both")
    by_mask = contrastive_alignment_loss(source, target, same_pair_mask=batch["align_same_pair"], directions="both")
    unmasked = contrastive_alignment_loss(source, target, directions="both")
    assert by_ids.item() == pytest.approx(by_mask.item(), abs=1e-6)
    assert by_ids.item() != pytest.approx(unmasked.item(), abs=1e-3)


def test_gathering_without_a_process_group_is_the_local_loss():
    torch.manual_seed(1)
    source, target = torch.randn(4, 8), torch.randn(4, 8)
    gathered = contrastive_alignment_loss(source, target, gather_across_devices=True)
    assert gathered.item() == pytest.approx(contrastive_alignment_loss(source, target).item(), abs=1e-7)


def test_bad_duplicate_arguments_are_refused():
    source, target = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="not both"):
        contrastive_alignment_loss(
            source, target, same_pair_mask=torch.zeros(3, 3, dtype=torch.bool), pair_ids=torch.zeros(3, 2)
        )
    with pytest.raises(ValueError, match=r"pair_ids must have shape \(batch, 2\)"):
        contrastive_alignment_loss(source, target, pair_ids=torch.zeros(3, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# Gradient caching on a toy encoder


class ToyEncoder(torch.nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.linear = torch.nn.Linear(6, 8)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(torch.tanh(self.linear(x)))


def toy_loss(pooled):
    sources, targets = zip(*(chunk.chunk(2) for chunk in pooled))
    return contrastive_alignment_loss(torch.cat(sources), torch.cat(targets), directions="both")


def toy_chunks(data, size):
    n = data.size(0) // 2
    return [torch.cat([data[s : min(s + size, n)], data[n + s : n + min(s + size, n)]]) for s in range(0, n, size)]


def test_gradient_cached_loss_equals_full_batch_and_follows_the_incoming_gradient():
    torch.manual_seed(2)
    encoder = ToyEncoder(dropout=0.0)
    data = torch.randn(2 * 12, 6)  # 12 sources, then their 12 targets

    loss = toy_loss([encoder(data)])  # one forward over the whole batch
    (0.3 * loss).backward()
    expected = encoder.linear.weight.grad.clone()
    encoder.zero_grad()

    chunks = toy_chunks(data, 5)  # mini-batches of 5, 5 and 2 pairs
    cached = gradient_cached_loss(lambda k: encoder(chunks[k]), len(chunks), toy_loss)
    assert cached.item() == pytest.approx(loss.item(), abs=1e-6)
    assert encoder.linear.weight.grad is None  # nothing back-propagated before backward()
    (0.3 * cached).backward()
    torch.testing.assert_close(encoder.linear.weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_gradient_cached_loss_replays_dropout_masks(monkeypatch):
    torch.manual_seed(3)
    encoder = ToyEncoder(dropout=0.5)
    data = torch.randn(2 * 8, 6)
    chunks = toy_chunks(data, 3)

    def reference_grad():
        torch.manual_seed(10)  # the same mini-batches in the same order, each with its graph
        toy_loss([encoder(chunk) for chunk in chunks]).backward()
        grad = encoder.linear.weight.grad.clone()
        encoder.zero_grad()
        return grad

    def cached_grad():
        torch.manual_seed(10)
        gradient_cached_loss(lambda k: encoder(chunks[k]), len(chunks), toy_loss).backward()
        grad = encoder.linear.weight.grad.clone()
        encoder.zero_grad()
        return grad

    expected = reference_grad()
    torch.testing.assert_close(cached_grad(), expected, rtol=1e-5, atol=1e-6)
    # Control: without restoring the generator, the second forward draws other dropout masks
    monkeypatch.setattr(losses_module._RngState, "restored", lambda self: contextlib.nullcontext())
    assert not torch.allclose(cached_grad(), expected, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient caching in AlignmentTrainer: real models


def trainer_for(tmp_path, tokenizer, model, rows=None, alignment_dataset=None, peft_config=None, **kwargs):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        align_schedule="alignment_only",
        align_layer=3,
    )
    settings.update(kwargs)
    return AlignmentTrainer(
        model=model,
        args=AlignmentConfig(**settings),
        train_dataset=Dataset.from_list(rows if rows is not None else task_rows(n=12)),
        processing_class=tokenizer,
        alignment_dataset=alignment_dataset,
        peft_config=peft_config,
    )


def gradients(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def set_attention_dropout(model, rate):
    count = 0
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = rate
            count += 1
    assert count > 0


def chunked_reference(trainer, model, batch, size):
    """The uncached step over the same mini-batches in the same order (each with its graph): same dropout draws."""
    n = batch["align_input_ids"].size(0) // 2
    pooled = []
    for start in range(0, n, size):
        end = min(start + size, n)
        rows = torch.cat([torch.arange(start, end), torch.arange(n + start, n + end)])
        length = int(batch["align_attention_mask"][rows].sum(dim=1).max())
        keys = ("align_input_ids", "align_attention_mask", "align_special_tokens_mask")
        chunk = {k: batch[k][rows, :length] for k in keys}
        pooled.append(trainer._pooled_pairs(model, chunk))
    sources, targets = zip(*(p.chunk(2) for p in pooled))
    return trainer._pair_loss(torch.cat(sources), torch.cat(targets), batch)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "variant", ["full", "lora", "gradient_checkpointing", "lora_gradient_checkpointing", "dropout"]
)
def test_cached_step_equals_uncached_step(tmp_path, tokenizer, kind, variant):
    lora = variant in ("lora", "lora_gradient_checkpointing", "dropout")
    peft_config = None
    if lora:
        dropout = 0.1 if variant == "dropout" else 0.0
        peft_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=dropout
        )
    trainer = trainer_for(
        tmp_path, tokenizer, build_model(kind, len(tokenizer)), peft_config=peft_config, align_directions="both"
    )
    model = trainer.model
    if "gradient_checkpointing" in variant:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
        assert model.is_gradient_checkpointing
    if variant == "dropout":
        set_attention_dropout(model, 0.2)
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])

    def step(mini_batch_size):
        trainer.args.align_mini_batch_size = mini_batch_size
        torch.manual_seed(7)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.item(), gradients(model)

    if variant == "dropout":
        torch.manual_seed(7)
        reference_loss = chunked_reference(trainer, model, batch, 3)
        reference_loss.backward()
        reference = (reference_loss.item(), gradients(model))
        other_draw = step(None)  # one forward over the whole batch draws other masks: dropout is really active
        assert other_draw[0] != pytest.approx(reference[0], abs=1e-4)
    else:
        reference = step(None)
    loss, grads = step(3)  # mini-batches of 3, 3 and 2 pairs
    assert loss == pytest.approx(reference[0], abs=1e-5)
    assert grads.keys() == reference[1].keys() and grads
    if lora:
        assert all("lora_" in name for name in grads)
    assert any("layers.0." in name for name in grads) and not any("layers.3." in name for name in grads)
    for name, grad in reference[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("schedule", ["alternate", "joint"])
def test_cached_training_equals_uncached_training_with_accumulation(tmp_path, tokenizer, schedule):
    """The trainer's loop (accumulation scaling of the alignment term included) runs the cached backward unchanged."""
    weights = []
    for mini_batch_size in (None, 2):
        trainer = trainer_for(
            tmp_path,
            tokenizer,
            build_model("llama", len(tokenizer)),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=3,
            align_schedule=schedule,
            align_weight=0.7,
            align_mini_batch_size=mini_batch_size,
            output_dir=str(tmp_path / f"out-{mini_batch_size}"),
        )
        trainer.train()
        logs = [log for log in trainer.state.log_history if "align_loss" in log]
        assert logs
        weights.append(({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, logs))
    (uncached, uncached_logs), (cached, cached_logs) = weights
    for old, new in zip(uncached_logs, cached_logs):
        assert new["align_loss"] == pytest.approx(old["align_loss"], abs=1e-5)
        assert new["loss"] == pytest.approx(old["loss"], abs=1e-5)
    start = build_model("llama", len(tokenizer)).state_dict()
    assert any(not torch.equal(start[n], p) for n, p in cached.items() if n in start), "training changed nothing"
    for name, value in uncached.items():
        torch.testing.assert_close(cached[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_mini_batch_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="align_mini_batch_size must be >= 1"):
        AlignmentConfig(output_dir=str(tmp_path), align_mini_batch_size=0, use_cpu=True, report_to="none")


# ---------------------------------------------------------------------------------------------------------------------
# align_batch_size: more pairs than task rows per step


def test_align_batch_size_attaches_several_pairs_per_row(tmp_path, tokenizer, caplog):
    pairs = Dataset.from_list([{"parallel_source": f"{s} {i}", "parallel_target": f"{t} {i}"}
                               for i, (s, t) in enumerate(PAIRS * 3)])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="trl_midalign"):
        trainer = trainer_for(
            tmp_path,
            tokenizer,
            build_model("llama", len(tokenizer)),
            rows=task_rows(n=8, with_pairs=False),
            alignment_dataset=pairs,
            per_device_train_batch_size=2,
            align_batch_size=6,
            align_schedule="alternate",
            max_steps=4,
        )
    assert "each training row carries 3 pairs, so an epoch uses 24 pair slots of 36 distinct pairs" in caplog.text
    row = trainer.train_dataset[0]
    assert len(row["parallel_source"]) == 3 and len(row["parallel_target"]) == 3
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].size(0) == 2  # 2 task rows ...
    assert batch["align_input_ids"].size(0) == 2 * 6  # ... and 6 pairs (sources, then targets)
    assert batch["align_same_pair"].shape == (6, 6)
    sources = [s for i in range(2) for s in trainer.train_dataset[i]["parallel_source"]]
    assert len(set(sources)) == 6  # distinct pairs, dealt out in turn
    trainer.train()
    logs = [log for log in trainer.state.log_history if "align_loss" in log]
    assert logs and all(torch.isfinite(torch.tensor(log["align_loss"])) for log in logs)


def test_align_batch_size_from_the_rows_own_pairs_and_pairs_alone(tmp_path, tokenizer, pair_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_midalign.trainer"):
        trainer = trainer_for(
            tmp_path, tokenizer, build_model("llama", len(tokenizer)), rows=task_rows(n=8), per_device_train_batch_size=2,
            align_batch_size=4, align_schedule="alternate",
        )  # fmt: skip
    assert "uses 16 pair slots per epoch but there are only 8 distinct pairs" in caplog.text
    assert len(trainer.train_dataset[3]["parallel_source"]) == 2

    only_pairs = AlignmentTrainer(
        model=build_model("llama", len(tokenizer)),
        args=AlignmentConfig(
            output_dir=str(tmp_path / "pairs"), per_device_train_batch_size=2, align_batch_size=6, max_steps=1,
            use_cpu=True, report_to="none", align_schedule="alignment_only", align_layer=3,
        ),
        train_dataset=None,
        alignment_dataset=pair_dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    assert len(only_pairs.train_dataset) == len(pair_dataset) // 3  # 12 pairs in 4 rows of 3: each pair once
    seen = [s for row in only_pairs.train_dataset for s in row["parallel_source"]]
    assert sorted(seen) == sorted(pair_dataset["parallel_source"])
    only_pairs.train()


def test_align_batch_size_must_be_a_multiple_of_the_task_batch(tmp_path):
    with pytest.raises(
        ValueError, match=r"align_batch_size=10 is not a multiple of per_device_train_batch_size=4.*8 or 12"
    ):
        AlignmentConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=4, align_batch_size=10, use_cpu=True,
            report_to="none",
        )  # fmt: skip


def test_collator_refuses_rows_with_unequal_pair_lists(tokenizer):
    collator = DataCollatorForAlignment(tokenizer)
    with pytest.raises(ValueError, match="Row 1 of the batch holds 2 sentences in 'parallel_source' but 1"):
        collator(
            [
                {"parallel_source": ["a b", "c d"], "parallel_target": ["e f", "g h"]},
                {"parallel_source": ["a", "b"], "parallel_target": ["c"]},
            ]
        )


# ---------------------------------------------------------------------------------------------------------------------
# Real 2-process launches on CPU (gloo)


@pytest.mark.slow
def test_gathered_loss_and_gradients_match_one_process_on_the_concatenated_batch(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        os.path.join(SCRIPTS, "gather_negatives.py"), str(tmp_path),
    ]  # fmt: skip
    run(command, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for rank in ranks:
        for case in rank["cases"]:
            label = f"rank {rank['rank']} {case}"
            # Each process's loss: its own rows scored against all candidates of both processes
            assert case["loss"] == pytest.approx(case["reference_loss_of_own_rows"], abs=1e-6), label
            # The duplicate across processes is masked (else the reference without the mask would match)
            assert case["reference_loss"] != pytest.approx(case["reference_loss_without_duplicate_mask"], abs=1e-3)
            sizes = case["rows_per_rank"]
            weighted = sum(s * loss for s, loss in zip(sizes, case["losses_of_all_ranks"])) / sum(sizes)
            assert weighted == pytest.approx(case["reference_loss"], abs=1e-6), label
            assert case["same_parameters_with_gradients"], label
            if sizes[0] == sizes[1]:
                # Gathered loss of the step (the mean over processes, what is logged) = one process's loss
                mean = sum(case["losses_of_all_ranks"]) / 2
                assert mean == pytest.approx(case["reference_loss"], abs=1e-6), label
                # DDP averages gradients over processes: that average equals the single-process gradient ...
                assert case["averaged_gradient_difference"] <= 1e-5, label
                # ... (so the plain sum is twice it, and one process's gradient alone is not it)
                assert case["summed_gradient_difference"] > 0.1 * case["max_abs_reference_gradient"], label
                assert case["local_gradient_difference"] > 0.1 * case["max_abs_reference_gradient"], label


def launch_training(tmp_path, name, overrides, processes, launcher_args=None, expect_success=True):
    output_dir = tmp_path / name
    output_dir.mkdir()
    script = os.path.join(SCRIPTS, "train_negatives.py")
    if processes == 1:
        command = [sys.executable, script, str(output_dir), json.dumps(overrides)]
    else:
        launcher_args = launcher_args or ["--num_processes", str(processes), "--multi_gpu"]
        command = [
            sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--main_process_port", str(free_port()),
            script, str(output_dir), json.dumps(overrides),
        ]  # fmt: skip
    if not expect_success:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([HERE, ROOT]),
        }
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    run(command, tmp_path)
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(processes)]


def max_weight_difference(a, b):
    assert a["weights"].keys() == b["weights"].keys()
    return max(abs(x - y) for name in a["weights"] for x, y in zip(a["weights"][name], b["weights"][name]))


def align_losses(result):
    return [log["align_loss"] for log in result["log_history"] if "align_loss" in log]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["alignment_only", "alternate"])
def test_ddp_with_gathered_negatives_and_gradient_caching_trains_like_one_process(tmp_path, schedule):
    """2 processes x 4 pairs with gathered negatives (and cached) = 1 process x 8 pairs, weights and losses."""
    common = {"align_schedule": schedule, "max_steps": 4 if schedule == "alternate" else 3}
    (single,) = launch_training(tmp_path, "single", {**common, "per_device_train_batch_size": 8}, 1)
    gathered = launch_training(
        tmp_path, "gathered", {**common, "per_device_train_batch_size": 4, "align_gather_negatives": True}, 2
    )
    cached = launch_training(
        tmp_path,
        "cached",
        {**common, "per_device_train_batch_size": 4, "align_gather_negatives": True, "align_mini_batch_size": 2},
        2,
    )
    for run_ranks in (gathered, cached):
        assert [r["distributed_type"] for r in run_ranks] == ["DistributedType.MULTI_CPU"] * 2
        assert max_weight_difference(run_ranks[0], run_ranks[1]) == 0.0, "ranks diverged"
        assert max_weight_difference(run_ranks[0], single) < 1e-6
        assert align_losses(run_ranks[0]) == pytest.approx(align_losses(single), abs=1e-5)
        assert align_losses(run_ranks[0])
    if schedule == "alignment_only":
        # Control: without gathering, each process only sees its own 4 pairs, which trains differently
        local = launch_training(tmp_path, "local", {**common, "per_device_train_batch_size": 4}, 2)
        assert max_weight_difference(local[0], single) > 1e-4
        assert align_losses(local[0]) != pytest.approx(align_losses(single), abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_with_gathered_negatives_trains_like_one_process(tmp_path, stage):
    config = ["--config_file", os.path.join(SCRIPTS, f"zero{stage}.yaml")]
    (single,) = launch_training(tmp_path, "single", {"per_device_train_batch_size": 8}, 1)
    ranks = launch_training(
        tmp_path, "zero", {"per_device_train_batch_size": 4, "align_gather_negatives": True}, 2, config
    )
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.DEEPSPEED"] * 2
    assert all(r["zero3_partitioned"] for r in ranks) == (stage == 3)
    assert max_weight_difference(ranks[0], ranks[1]) == 0.0, "ranks diverged"
    assert max_weight_difference(ranks[0], single) < 1e-6
    assert align_losses(ranks[0]) == pytest.approx(align_losses(single), abs=1e-5)


@pytest.mark.slow
def test_gradient_caching_is_refused_under_deepspeed(tmp_path):
    """ZeRO-2 reduces each gradient once per backward; caching accumulates it once per mini-batch (DeepSpeed raises
    'Gradient computed twice for this partition' when allowed), so the trainer refuses the combination up front."""
    config = ["--config_file", os.path.join(SCRIPTS, "zero2.yaml")]
    overrides = {"per_device_train_batch_size": 4, "align_mini_batch_size": 2}
    result = launch_training(tmp_path, "refused", overrides, 2, config, expect_success=False)
    assert result.returncode != 0
    assert "align_mini_batch_size=2 (gradient caching) is not supported under DeepSpeed" in result.stderr
