import copy
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import LoraConfig
from safetensors.torch import load_file
from testing_utils import PAIRS, alignment_config, block_of, build_model, plain_info_nce, plain_pool, task_rows
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainerCallback
from trl import SFTConfig

from trl_midalign import AlignmentConfig, AlignmentTrainer, contrastive_alignment_loss, masked_mean_pool
from trl_midalign.layers import layer_hidden_states
from trl_midalign.losses import POOLINGS


def config(tmp_path, **kwargs) -> AlignmentConfig:
    return alignment_config(**{"output_dir": tmp_path / "out", **kwargs})


def trainer_for(tmp_path, tokenizer, rows=None, model=None, **kwargs):
    alignment_dataset = kwargs.pop("alignment_dataset", None)
    peft_config = kwargs.pop("peft_config", None)
    eval_dataset = kwargs.pop("eval_dataset", None)
    return AlignmentTrainer(
        model=model if model is not None else build_model("llama", len(tokenizer)),
        args=config(tmp_path, **kwargs),
        train_dataset=Dataset.from_list(rows if rows is not None else task_rows()),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        alignment_dataset=alignment_dataset,
        peft_config=peft_config,
    )


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(before, model):
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "conversational"])
def test_every_sft_format_trains_and_logs_both_losses(tmp_path, tokenizer, fmt):
    trainer = trainer_for(tmp_path, tokenizer, task_rows(fmt))
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model), "no parameter changed"
    logs = trainer.state.log_history
    assert any("task_loss" in log for log in logs) and any("align_loss" in log for log in logs)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs if "loss" in log)


def test_alternate_schedule_alternates_starting_with_task(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer, max_steps=6)
    trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    kinds = ["task" if "task_loss" in log else "align" for log in steps]
    assert kinds == ["task", "align"] * 3
    for log in steps:
        assert ("task_loss" in log) != ("align_loss" in log)
        assert log["loss"] == pytest.approx(log.get("task_loss", log.get("align_loss")), rel=1e-5)


def test_joint_schedule_adds_weighted_alignment_each_step(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer, align_schedule="joint", align_weight=0.5, max_steps=3)
    trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 3
    for log in steps:
        assert log["loss"] == pytest.approx(log["task_loss"] + 0.5 * log["align_loss"], rel=1e-4)


def test_sft_config_and_training_arguments_become_alignment_config(tmp_path, tokenizer):
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to="none", use_cpu=True
    )
    trainer = AlignmentTrainer(
        model=build_model("llama", len(tokenizer)),
        args=args,
        train_dataset=Dataset.from_list(task_rows()),
        processing_class=tokenizer,
    )
    assert isinstance(trainer.args, AlignmentConfig)
    assert trainer.args.max_steps == 2 and trainer.args.per_device_train_batch_size == 4
    assert trainer.args.align_schedule == "alternate" and trainer.align_layer == 2
    trainer.train()
    assert trainer.state.global_step == 2


def test_reference_column_names_work_through_options(tmp_path, tokenizer):
    rows = [
        {
            "prefix": r["prompt"],
            "text": r["completion"],
            "text_parallel_0": r["parallel_source"],
            "text_parallel_1": r["parallel_target"],
        }
        for r in task_rows()
    ]
    rows = [{"prompt": r.pop("prefix"), "completion": r.pop("text"), **r} for r in rows]
    trainer = trainer_for(
        tmp_path, tokenizer, rows, align_source_column="text_parallel_0", align_target_column="text_parallel_1"
    )
    trainer.train()
    assert any("align_loss" in log for log in trainer.state.log_history)


def test_alignment_dataset_is_attached_to_task_rows(tmp_path, tokenizer, pair_dataset):
    trainer = trainer_for(
        tmp_path, tokenizer, task_rows(n=8, with_pairs=False), alignment_dataset=pair_dataset, max_steps=2
    )
    columns = trainer.train_dataset.column_names
    assert "parallel_source" in columns and "parallel_target" in columns
    attached = set(zip(trainer.train_dataset["parallel_source"], trainer.train_dataset["parallel_target"]))
    assert attached <= set(PAIRS) and len(attached) == 8  # 8 distinct pairs of the 12, shuffled
    trainer.train()
    assert any("align_loss" in log for log in trainer.state.log_history)


def test_alignment_only_module_from_pairs_alone_changes_only_blocks_below_layer(tmp_path, tokenizer, pair_dataset):
    model = build_model("llama", len(tokenizer), num_layers=6)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    trainer = AlignmentTrainer(
        model=model,
        args=config(tmp_path, align_schedule="alignment_only", align_layer=3, max_steps=3),
        train_dataset=None,
        alignment_dataset=pair_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(before, trainer.model)
    lora_b = {n for n in before if "lora_B" in n}
    assert {n for n in lora_b if block_of(n) < 3} <= moved
    assert not {n for n in moved if block_of(n) >= 3}
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs and all("align_loss" in log and "task_loss" not in log for log in logs)
    trainer.save_model()
    adapter_config = json.load(open(os.path.join(trainer.args.output_dir, "adapter_config.json")))
    assert adapter_config["layers_to_transform"] == [0, 1, 2]
    assert peft_config.layers_to_transform is None  # the caller's config is left as it was
    saved = load_file(os.path.join(trainer.args.output_dir, "adapter_model.safetensors"))
    assert {block_of(n) for n in saved} == {0, 1, 2}


@pytest.mark.parametrize("target_modules", ["all-linear", r".*\.(q_proj|down_proj)"])
def test_alignment_only_with_string_target_modules_puts_lora_below_the_layer(
    tmp_path, tokenizer, pair_dataset, target_modules
):
    """PEFT refuses layers_to_transform with a string target_modules: the string is resolved to the modules it selects
    in the blocks below the layer."""
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0)
    trainer = AlignmentTrainer(
        model=build_model("llama", len(tokenizer), num_layers=6),
        args=config(tmp_path, align_schedule="alignment_only", align_layer=3, max_steps=2),
        train_dataset=None,
        alignment_dataset=pair_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    targeted = trainer.model.base_model.targeted_module_names
    assert {block_of(n) for n in targeted} == {0, 1, 2}
    kinds = {n.rsplit(".", 1)[-1] for n in targeted}
    if target_modules == "all-linear":
        assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    else:
        assert kinds == {"q_proj", "down_proj"}
    assert peft_config.target_modules == target_modules  # the caller's config is left as it was
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(before, trainer.model)
    assert {n for n in moved if "lora_B" in n} and not {n for n in moved if block_of(n) >= 3}


def test_alignment_only_refuses_string_target_modules_that_select_nothing_below_the_layer(
    tmp_path, tokenizer, pair_dataset
):
    with pytest.raises(ValueError, match=r"target_modules='lm_head' selects no module .* below the aligned layer 3"):
        AlignmentTrainer(
            model=build_model("llama", len(tokenizer), num_layers=6),
            args=config(tmp_path, align_schedule="alignment_only", align_layer=3, max_steps=2),
            train_dataset=None,
            alignment_dataset=pair_dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules="lm_head"),
        )


def test_alignment_only_auto_layer_probes_per_language_and_keeps_lora_below_it(tmp_path, tokenizer):
    from trl_midalign.probing import probe_layers

    model = build_model("llama", len(tokenizer), num_layers=6, seed=3)
    pairs = Dataset.from_list(
        [
            {"language": "de" if i < 6 else "fr", "parallel_source": s, "parallel_target": t}
            for i, (s, t) in enumerate(PAIRS)
        ]
    )
    expected = probe_layers(copy.deepcopy(model), tokenizer, pairs, show_progress=False)
    assert expected.languages == ["de", "fr"]
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = AlignmentTrainer(
        model=model,
        args=config(tmp_path, align_schedule="alignment_only", align_layer="auto", max_steps=2),
        train_dataset=None,
        alignment_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    layer = expected.recommended_layer
    assert trainer.align_layer == layer and sorted(trainer.align_probe.languages) == ["de", "fr"]
    for language in ("de", "fr", "mean"):
        assert trainer.align_probe.retrieval_accuracy[language] == pytest.approx(expected.retrieval_accuracy[language])
    lora_blocks = {block_of(n) for n, _ in trainer.model.named_parameters() if "lora_" in n}
    assert lora_blocks == set(range(layer))
    trainer.train()
    trainer.save_model()
    adapter_config = json.load(open(os.path.join(trainer.args.output_dir, "adapter_config.json")))
    assert adapter_config["layers_to_transform"] == list(range(layer))
    assert peft_config.layers_to_transform is None
    saved = load_file(os.path.join(trainer.args.output_dir, "adapter_model.safetensors"))
    assert {block_of(n) for n in saved} == set(range(layer))
    targeted = trainer.model.base_model.targeted_module_names
    assert targeted and {block_of(n) for n in targeted} == set(range(layer))


def test_alignment_only_keeps_every_module_of_a_peft_model_passed_in(tmp_path, tokenizer, pair_dataset):
    """An adapter the caller built (maybe trained before) is never cut down: its upper blocks may hold real deltas."""
    from peft import get_peft_model

    model = get_peft_model(
        build_model("llama", len(tokenizer), num_layers=6), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    trainer = AlignmentTrainer(
        model=model,
        args=config(tmp_path, align_schedule="alignment_only", align_layer=3, max_steps=1),
        train_dataset=None,
        alignment_dataset=pair_dataset,
        processing_class=tokenizer,
    )
    lora_blocks = {block_of(n) for n, _ in trainer.model.named_parameters() if "lora_" in n}
    assert lora_blocks == set(range(6))
    assert trainer.model.peft_config["default"].layers_to_transform is None


def test_eval_logs_align_loss(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer, eval_dataset=Dataset.from_list(task_rows(n=4)), max_steps=2)
    metrics = trainer.evaluate()
    assert "eval_align_loss" in metrics and "eval_task_loss" in metrics
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_task_loss"], rel=1e-5)  # alternate: task loss


class GradientRecorder(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def record_batches(trainer):
    batches = []
    collate = trainer.data_collator

    def recording(examples):
        out = collate(examples)
        batches.append(copy.deepcopy(out))
        return out

    trainer.data_collator = recording
    return batches


def plain_task_sum(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")


def plain_align(model, batch, layer):
    states = layer_hidden_states(model, batch["align_input_ids"], batch["align_attention_mask"], layer)
    source, target = masked_mean_pool(states, batch["align_attention_mask"]).chunk(2)
    return contrastive_alignment_loss(source, target, same_pair_mask=batch["align_same_pair"])


@pytest.mark.parametrize("schedule", ["joint", "alternate"])
def test_gradient_accumulation_scales_both_terms(tmp_path, tokenizer, schedule):
    """One optimizer step over 2 accumulated micro-batches gives the gradient of a plain-torch loss."""
    model = build_model("llama", len(tokenizer))
    reference = copy.deepcopy(model)
    recorder = GradientRecorder()
    trainer = trainer_for(
        tmp_path,
        tokenizer,
        model=model,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        max_grad_norm=0.0,
        align_schedule=schedule,
        align_weight=0.7,
    )
    trainer.add_callback(recorder)
    batches = record_batches(trainer)
    trainer.train()
    assert len(recorder.grads) == 1
    batches = batches[:2]  # the data loader may have prefetched the next batch already

    def tokens(batch):
        return batch["labels"][:, 1:].ne(-100).sum()

    if schedule == "joint":
        total_tokens = tokens(batches[0]) + tokens(batches[1])
        loss = sum(plain_task_sum(reference, b) for b in batches) / total_tokens
        loss = loss + 0.7 * sum(plain_align(reference, b, trainer.align_layer) for b in batches) / 2
    else:  # task step on the first micro-batch, alignment step on the second
        loss = plain_task_sum(reference, batches[0]) / tokens(batches[0])
        loss = loss + 0.7 * plain_align(reference, batches[1], trainer.align_layer)
    loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert expected.keys() == recorder.grads[0].keys()
    for name, grad in expected.items():
        torch.testing.assert_close(recorder.grads[0][name], grad, rtol=1e-4, atol=1e-6)


def test_resume_reproduces_uninterrupted_losses(tmp_path, tokenizer):
    rows = task_rows(n=16)

    class StopAt(TrainerCallback):
        # Simulates an interruption: same max_steps (so the same LR schedule), but training stops after step 3
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    def run(output_dir, max_steps, resume=None, callbacks=None):
        trainer = AlignmentTrainer(
            model=build_model("llama", len(tokenizer)),
            args=config(
                tmp_path,
                output_dir=str(output_dir),
                max_steps=max_steps,
                save_strategy="steps",
                save_steps=3,
                per_device_train_batch_size=2,
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 6)
    interrupted_dir = tmp_path / "interrupted"
    run(interrupted_dir, 6, callbacks=[StopAt()])
    assert not (interrupted_dir / "checkpoint-6").exists()
    with open(interrupted_dir / "checkpoint-3" / "alignment_state.json") as f:
        assert json.load(f)["align_micro_step"] == 3
    resumed = run(interrupted_dir, 6, resume=str(interrupted_dir / "checkpoint-3"))

    def losses(trainer):
        return {log["step"]: (log["loss"], "align_loss" in log) for log in trainer.state.log_history if "loss" in log}

    full_losses, resumed_losses = losses(full), losses(resumed)
    for step in (4, 5, 6):
        assert resumed_losses[step][1] == full_losses[step][1], f"phase differs at step {step}"
        assert resumed_losses[step][0] == pytest.approx(full_losses[step][0], rel=1e-5)
    assert [full_losses[s][1] for s in (4, 5, 6)] == [True, False, True]


def test_model_card_has_paper_tags_and_settings(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer, max_steps=1, align_temperature=0.05)
    trainer.train()
    trainer.create_model_card(model_name="tiny")
    card = open(os.path.join(trainer.args.output_dir, "README.md")).read()
    assert "2502.14830" in card and "liu2025middle" in card
    assert "trl-midalign" in card
    assert "| `align_temperature` | `0.05` |" in card and "layer 2 of 4" in card
    metadata = ModelCard.load(os.path.join(trainer.args.output_dir, "README.md")).data.trl_midalign
    assert metadata["align_temperature"] == 0.05 and metadata["aligned_layer"] == 2
    trainer.create_model_card(model_name="tiny")  # again: one alignment section, not two
    again = open(os.path.join(trainer.args.output_dir, "README.md")).read()
    assert again.count("## Cross-lingual alignment") == 1


# --------------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_pair_columns_are_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="no column 'parallel_source'.*alignment_dataset"):
        trainer_for(tmp_path, tokenizer, task_rows(with_pairs=False))


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_sentences_are_refused_with_row_and_column(tmp_path, tokenizer, bad):
    rows = task_rows()
    rows[5]["parallel_target"] = bad
    with pytest.raises(ValueError, match="Row 5 of the train dataset: column 'parallel_target'"):
        trainer_for(tmp_path, tokenizer, rows)


def test_batch_of_one_pair_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="at least 2 rows per batch"):
        config(tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="last batch of each epoch holds a single pair.*dataloader_drop_last"):
        trainer_for(tmp_path, tokenizer, task_rows(n=9))
    trainer = trainer_for(tmp_path, tokenizer, task_rows(n=9), dataloader_drop_last=True, max_steps=2)
    trainer.train()


def test_layer_outside_model_names_real_depth(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="it has 4 decoder blocks"):
        trainer_for(tmp_path, tokenizer, align_layer=7)
    with pytest.raises(ValueError, match="embedding output"):
        config(tmp_path, align_layer=0)
    with pytest.raises(ValueError, match="not understood"):
        config(tmp_path, align_layer="top")


def test_model_without_block_stack_is_refused(tmp_path, tokenizer):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="Could not find the decoder block stack"):
        trainer_for(tmp_path, tokenizer, model=model)


def test_long_sentences_are_truncated_with_one_warning(tmp_path, tokenizer, caplog):
    rows = task_rows()
    for row in rows:
        row["parallel_source"] = " ".join([row["parallel_source"]] * 10)
    trainer = trainer_for(tmp_path, tokenizer, rows, align_max_length=8, max_steps=4)
    batches = record_batches(trainer)
    with caplog.at_level(logging.WARNING, logger="trl_midalign.data"):
        trainer.train()
    warnings = [r for r in caplog.records if "align_max_length=8" in r.getMessage()]
    assert len(warnings) == 1
    assert all(b["align_input_ids"].shape[1] <= 8 for b in batches)


def test_duplicate_pairs_are_masked_in_the_batch(tmp_path, tokenizer):
    rows = task_rows(n=4)
    rows[2]["parallel_target"] = rows[0]["parallel_target"]
    trainer = trainer_for(tmp_path, tokenizer, rows, max_steps=1)
    batch = trainer.data_collator([dict(r, input_ids=[1, 5, 6]) for r in rows])
    same = batch["align_same_pair"]
    assert same[0, 2] and same[2, 0] and not same[0, 1] and same.diagonal().all()


def test_eval_batch_of_one_pair_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="per_device_eval_batch_size=1"):
        trainer_for(tmp_path, tokenizer, eval_dataset=Dataset.from_list(task_rows(n=4)), per_device_eval_batch_size=1)


def test_auto_layer_takes_the_probe_s_best_layer(tmp_path, tokenizer):
    from trl_midalign.probing import probe_layers

    model = build_model("llama", len(tokenizer), num_layers=6, seed=3)
    rows = task_rows(n=12)
    expected = probe_layers(copy.deepcopy(model), tokenizer, Dataset.from_list(rows), show_progress=False)
    trainer = trainer_for(tmp_path, tokenizer, rows, model=model, align_layer="auto", max_steps=2)
    assert trainer.align_layer == expected.recommended_layer
    assert trainer.align_probe.retrieval_accuracy["mean"] == pytest.approx(expected.retrieval_accuracy["mean"])
    trainer.train()
    assert any("align_loss" in log for log in trainer.state.log_history)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_alignment_loss_pools_as_align_pooling_says(tmp_path, tokenizer, pooling):
    trainer = trainer_for(tmp_path, tokenizer, align_pooling=pooling, align_layer=2, max_steps=1)
    rows = task_rows(n=4)
    pair = trainer.data_collator([dict(r, input_ids=[1, 5, 6]) for r in rows])
    ids, mask = pair["align_input_ids"], pair["align_attention_mask"]
    assert torch.equal(pair["align_special_tokens_mask"], torch.isin(ids, torch.tensor(tokenizer.all_special_ids)))
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer._alignment_loss(model, pair)
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2].double()
    if pooling == "last":
        lengths = mask.sum(dim=1)
        pooled = torch.stack([states[row, lengths[row] - 1] for row in range(ids.size(0))])
    else:
        keep = mask if pooling == "mean" else mask * ~pair["align_special_tokens_mask"]
        pooled = plain_pool(states, keep)
    source, target = pooled.chunk(2)
    assert loss.item() == pytest.approx(plain_info_nce(source, target, 0.1), abs=1e-5)


def test_auto_layer_probes_with_the_training_pooling(tmp_path, tokenizer):
    from trl_midalign.probing import probe_layers

    model = build_model("llama", len(tokenizer), num_layers=6, seed=3)
    rows = task_rows(n=12)
    expected = probe_layers(copy.deepcopy(model), tokenizer, Dataset.from_list(rows), pooling="last")
    by_mean = probe_layers(copy.deepcopy(model), tokenizer, Dataset.from_list(rows), pooling="mean")
    assert expected.recommended_layer != by_mean.recommended_layer  # the pooling decides here
    trainer = trainer_for(tmp_path, tokenizer, rows, model=model, align_layer="auto", align_pooling="last")
    assert trainer.align_probe.pooling == "last"
    assert trainer.align_layer == expected.recommended_layer
    assert trainer.align_probe.retrieval_accuracy["mean"] == pytest.approx(expected.retrieval_accuracy["mean"])


def test_model_given_by_path_is_loaded_before_the_layer_is_resolved(tmp_path, tokenizer, tiny_model_dir):
    """A model name is loaded here (as SFTTrainer would, with model_init_kwargs), so that align_layer='auto' can probe
    it and the adapter of an alignment-only module is created on the blocks below the layer from the start."""
    from trl_midalign.probing import probe_layers

    pairs = Dataset.from_list([{"parallel_source": s, "parallel_target": t} for s, t in PAIRS])
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = probe_layers(reference, tokenizer, pairs, show_progress=False)
    args = config(
        tmp_path,
        align_schedule="alignment_only",
        align_layer="auto",
        max_steps=1,
        model_init_kwargs={"dtype": "float32"},
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = AlignmentTrainer(
        model=tiny_model_dir, args=args, train_dataset=None, alignment_dataset=pairs, peft_config=peft_config
    )
    layer = expected.recommended_layer
    assert trainer.align_layer == layer
    assert trainer.processing_class.get_vocab() == tokenizer.get_vocab()  # loaded from the model's folder
    assert trainer.args.model_init_kwargs == {"dtype": "float32"}  # the caller's settings are kept
    assert trainer.model.peft_config["default"].layers_to_transform == list(range(layer))
    assert {block_of(n) for n, _ in trainer.model.named_parameters() if "lora_" in n} == set(range(layer))
    assert trainer.model.get_base_model().dtype == torch.float32
    trainer.train()
    assert any("align_loss" in log for log in trainer.state.log_history)


def test_command_line_choices_come_from_where_they_are_implemented():
    from transformers import HfArgumentParser

    from trl_midalign.losses import DIRECTIONS, STOP_GRADIENTS
    from trl_midalign.schedules import SCHEDULES

    parser = HfArgumentParser(AlignmentConfig)
    choices = {action.dest: action.choices for action in parser._actions if action.dest.startswith("align_")}
    assert list(choices["align_pooling"]) == list(POOLINGS)
    assert list(choices["align_directions"]) == list(DIRECTIONS)
    assert list(choices["align_stop_gradient"]) == list(STOP_GRADIENTS)
    assert list(choices["align_schedule"]) == list(SCHEDULES) == ["alternate", "joint", "alignment_only"]
    common = ["--output_dir", "out", "--use_cpu", "--bf16", "false", "--report_to", "none"]
    (args,) = parser.parse_args_into_dataclasses(common + ["--align_stop_gradient", "None", "--align_layer", "-1"])
    assert args.align_stop_gradient is None and args.align_layer == -1
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(common + ["--align_pooling", "max"])
