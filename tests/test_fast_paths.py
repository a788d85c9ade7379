"""TRL's fast paths with alignment pairs: padding-free task batches and packed task batches."""

import math

import pytest
import torch
from conftest import PAIRS, TASKS, build_model
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from trl_midalign import AlignmentConfig, AlignmentTrainer


def long_rows(n: int = 12) -> list[dict]:
    """Prompt-completion rows of different lengths (5 to 40 tokens), longer than Gemma 3's tiny sliding window of 8."""
    rows = []
    for i in range(n):
        prompt = f"{i}. " + " and ".join(TASKS[(i + k) % len(TASKS)][0] for k in range(1 + i % 4))  # all different
        source, target = PAIRS[i % len(PAIRS)]
        rows.append(
            {"prompt": prompt, "completion": " " + TASKS[i % len(TASKS)][1], "parallel_source": source,
             "parallel_target": target}
        )  # fmt: skip
    return rows


def config(tmp_path, **kwargs) -> AlignmentConfig:
    values = dict(
        output_dir=str(tmp_path), max_steps=6, logging_steps=1, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, use_cpu=True, seed=0,
        dataloader_drop_last=True,
    )  # fmt: skip
    values.update(kwargs)
    return AlignmentConfig(**values)


def train_log(tmp_path, kind, tokenizer, **kwargs):
    model = build_model(kind, len(tokenizer), num_layers=4)
    assert model.config.use_cache, "the comparison must show that the trainer turns the cache off itself"
    trainer = AlignmentTrainer(
        model=model, args=config(tmp_path, **kwargs), train_dataset=Dataset.from_list(long_rows()),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return trainer, logs, weights


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_padding_free_steps_equal_padded_steps(tmp_path, tokenizer, kind):
    """6 alternating steps (3 task, 3 alignment) with padding-free task batches give the padded run's losses: the
    packed sequences of one row do not attend to each other (per-sequence position_ids, no cache), also under
    Gemma 3's sliding window. Tolerance 1e-5 on each loss and 1e-6 on every weight. SGD, because AdamW divides by the
    root of the second moment and so magnifies float round-off in near-zero gradients (up to 1.3e-4 on Gemma 3)."""
    padded, padded_logs, padded_weights = train_log(tmp_path / "padded", kind, tokenizer, max_length=None, optim="sgd")
    free, free_logs, free_weights = train_log(
        tmp_path / "free", kind, tokenizer, max_length=None, optim="sgd", padding_free=True
    )
    assert free.padding_free and not padded.padding_free
    batch = next(iter(free.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # really one packed row per batch
    assert len(free_logs) == len(padded_logs) == 6
    for mine, theirs in zip(free_logs, padded_logs):
        for key in ("loss", "task_loss", "align_loss"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
    assert {"task_loss", "align_loss"} <= {key for log in free_logs for key in log}
    assert torch.allclose(free_weights, padded_weights, atol=1e-6)
    assert not torch.allclose(
        free_weights, torch.cat([p.flatten() for p in build_model(kind, len(tokenizer)).parameters()])
    )


def test_padding_free_refuses_attention_that_mixes_sequences(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    model.config._attn_implementation_internal = "my_custom_kernel"
    with pytest.raises(ValueError, match="attn_implementation='my_custom_kernel'.*sdpa"):
        AlignmentTrainer(
            model=model, args=config(tmp_path, max_length=None, padding_free=True),
            train_dataset=Dataset.from_list(long_rows()), processing_class=tokenizer,
        )  # fmt: skip


def segments(row: dict) -> list[list[int]]:
    ids, out, start = row["input_ids"], [], 0
    for length in row["seq_lengths"]:
        out.append(ids[start : start + length])
        start += length
    return out


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packing_keeps_every_pair_and_matches_sft_trainer(tmp_path, tokenizer, strategy):
    rows = long_rows(14)
    pack = dict(packing=True, packing_strategy=strategy, max_length=48)
    sft = SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(**{k: v for k, v in config(tmp_path / "sft", **pack).to_dict().items() if not k.startswith("align_")
                          and k in SFTConfig.__dataclass_fields__ and not k.endswith("_token")}),
        train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "completion")} for r in rows]),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer = AlignmentTrainer(
        model=build_model("llama", len(tokenizer)), args=config(tmp_path / "align", **pack),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )  # fmt: skip
    ours, theirs = trainer.train_dataset, sft.train_dataset
    # the same packed task rows, in the same order, as SFTTrainer builds
    assert ours["input_ids"] == theirs["input_ids"]
    assert len(ours) < len(rows)

    # every row's pair is carried exactly once per epoch (wrapped packing may add pairs for rows split across)
    carried = [(s, t) for row in ours for s, t in zip(row["parallel_source"], row["parallel_target"])]
    expected = [(r["parallel_source"], r["parallel_target"]) for r in rows]
    assert sorted(set(carried)) == sorted(set(expected))
    if strategy == "bfd":
        assert sorted(carried) == sorted(expected)
        # ... by the packed row that holds that row's tokens
        tokenized = {}
        for index, row in enumerate(sft._prepare_dataset(
            Dataset.from_list([{k: r[k] for k in ("prompt", "completion")} for r in rows]), tokenizer,
            sft.args, False, None, "check")):  # fmt: skip
            tokenized.setdefault(tuple(row["input_ids"][:48]), []).append(index)
        for row in ours:
            indices = sorted(i for segment in segments(row) for i in tokenized[tuple(segment)])
            assert sorted(zip(row["parallel_source"], row["parallel_target"])) == sorted(expected[i] for i in indices)

    # the task loss of a packed batch is SFTTrainer's; the alignment batch holds the pairs of the packed rows
    batch = next(iter(trainer.get_train_dataloader()))
    sft_batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items() if not k.startswith("align_")}
    sft.model.load_state_dict(trainer.model.state_dict())
    trainer.model.train(), sft.model.train()
    ours_loss = trainer.compute_loss(trainer.model, dict(batch))  # micro-step 0 of the alternate schedule: task
    assert ours_loss.item() == pytest.approx(sft.compute_loss(sft.model, sft_batch).item(), rel=1e-6)
    packed_rows = [ours[i] for i in range(4)]
    collated = trainer.data_collator(packed_rows)
    decoded = tokenizer.batch_decode(collated["align_input_ids"], skip_special_tokens=True)
    sources = [s for row in packed_rows for s in row["parallel_source"]]
    targets = [t for row in packed_rows for t in row["parallel_target"]]
    assert decoded == sources + targets  # all pairs of the packed rows, sources first, then targets
    assert collated["align_same_pair"].shape == (len(sources), len(sources))

    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    logged = {key for log in trainer.state.log_history for key in log}
    assert {"task_loss", "align_loss"} <= logged


def test_fsdp1_is_refused_with_the_fix(tmp_path, tokenizer, monkeypatch):
    rows = Dataset.from_list(long_rows())
    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        AlignmentTrainer(
            model=build_model("llama", len(tokenizer)), args=config(tmp_path, fsdp=True, fsdp_config={"version": 1}),
            train_dataset=rows, processing_class=tokenizer,
        )  # fmt: skip
    # as `accelerate launch` with an FSDP config sets it (version 1 is accelerate's default)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(ValueError, match="FSDP version 1 is not supported"):
        AlignmentTrainer(
            model=build_model("llama", len(tokenizer)), args=config(tmp_path), train_dataset=rows,
            processing_class=tokenizer,
        )  # fmt: skip


def test_fsdp2_accelerate_config_is_fsdp2_with_a_block_wrap():
    import os

    from accelerate.commands.config.config_args import ClusterConfig

    path = os.path.join(os.path.dirname(__file__), "..", "recipes", "accelerate_configs", "fsdp2.yaml")
    config = ClusterConfig.from_yaml_file(path)  # accelerate's own parser, as `accelerate launch --config_file`
    assert config.distributed_type == "FSDP"  # a str enum
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_activation_checkpointing" in config.fsdp_config


def test_packed_evaluation_set_gives_task_and_alignment_losses(tmp_path, tokenizer):
    rows = long_rows(14)
    trainer = AlignmentTrainer(
        model=build_model("llama", len(tokenizer)),
        args=config(tmp_path, packing=True, max_length=48, per_device_eval_batch_size=2),
        train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:10]), processing_class=tokenizer,
    )  # fmt: skip
    assert len(trainer.eval_dataset) < 10  # packed too (eval_packing follows packing)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_task_loss"]) and math.isfinite(metrics["eval_align_loss"])
