"""Bad input to the trainer, its config and its collator: each case gets a clear error (type, and a message naming the
setting / column / row / file and the fix) or a correct result, never a silent wrong one.

Cases (the docs count them): eval sets without pairs; pairs without any valid negative; non-finite or ill-typed
settings and a loss that turns non-finite while training; resuming with another schedule, from a broken or missing
checkpoint; rows dropped by TRL's preparation; an output_dir holding another run's checkpoints; encoder and meta-device
models; and the cases that already gave clear errors (pair columns, batch of one, layer, packing, GPT-2, ...). Third
round: streamed sets (eval equal to a Dataset's, checks on the first rows), identical sides, absurd temperature and
weight, DatasetDict and other containers, output_dir a file, concurrent and killed runs (the lock), a full disk.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import Dataset, IterableDataset
from safetensors.torch import load_file
from testing_utils import PAIRS, alignment_config, build_model, task_rows, tiny_config
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
)
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_midalign import AlignmentConfig, AlignmentTrainer, DataCollatorForAlignment
from trl_midalign.data import check_pairs


TRAINER_LOGGER = "trl_midalign.trainer"


def config(tmp_path, **kwargs) -> AlignmentConfig:
    return alignment_config(**{"output_dir": tmp_path / "out", "max_steps": 2, "disable_tqdm": True, **kwargs})


def make_trainer(tmp_path, tokenizer, rows=None, model=None, train_dataset=..., **kwargs):
    extra = {key: kwargs.pop(key) for key in ("alignment_dataset", "eval_dataset", "peft_config") if key in kwargs}
    if train_dataset is ...:
        train_dataset = Dataset.from_list(rows if rows is not None else task_rows())
    return AlignmentTrainer(
        model=model if model is not None else build_model("llama", len(tokenizer)),
        args=config(tmp_path, **kwargs),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        **extra,
    )


def rows_with_pairs(pairs, fmt="prompt_completion"):
    """Task rows whose pair columns hold `pairs`, in order."""
    rows = task_rows(fmt, n=len(pairs), with_pairs=False)
    for row, (source, target) in zip(rows, pairs):
        row["parallel_source"], row["parallel_target"] = source, target
    return rows


def all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def folder_hash(path) -> str:
    """One hash over every file (name and bytes) under `path`."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def warnings_of(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# --------------------------------------------------------------------------------------------------------------------
# 1. Evaluation sets without pairs: the task loss is evaluated, the alignment loss only where there are pairs


def test_eval_set_without_pairs_evaluates_task_loss_during_training(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        trainer = make_trainer(
            tmp_path,
            tokenizer,
            eval_dataset=Dataset.from_list(task_rows(n=4, with_pairs=False)),
            eval_strategy="steps",
            eval_steps=2,
        )
    assert warnings_of(caplog, "The eval dataset has no alignment pairs")
    assert trainer.data_collator.require_pairs  # training stays strict
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert evals and math.isfinite(evals[0]["eval_loss"])
    assert evals[0]["eval_loss"] == pytest.approx(evals[0]["eval_task_loss"], rel=1e-5)
    assert not any("eval_align_loss" in log for log in evals)


def test_evaluate_with_a_set_without_pairs_passed_in(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    metrics = trainer.evaluate(eval_dataset=Dataset.from_list(task_rows(n=6, with_pairs=False)))
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_task_loss"])
    assert "eval_align_loss" not in metrics


@pytest.mark.parametrize("schedule", ["alternate", "joint"])
def test_eval_dict_mixing_sets_with_and_without_pairs(tmp_path, tokenizer, schedule):
    eval_sets = {
        "pairs": Dataset.from_list(task_rows(n=4)),
        "plain": Dataset.from_list(task_rows(n=4, with_pairs=False)),
    }
    trainer = make_trainer(tmp_path, tokenizer, eval_dataset=eval_sets, align_schedule=schedule, align_weight=0.5)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_pairs_align_loss"]) and math.isfinite(metrics["eval_plain_task_loss"])
    assert "eval_plain_align_loss" not in metrics
    assert metrics["eval_plain_loss"] == pytest.approx(metrics["eval_plain_task_loss"], rel=1e-5)
    if schedule == "joint":
        expected = metrics["eval_pairs_task_loss"] + 0.5 * metrics["eval_pairs_align_loss"]
    else:  # the alternate schedule reports the task loss as eval loss
        expected = metrics["eval_pairs_task_loss"]
    assert metrics["eval_pairs_loss"] == pytest.approx(expected, rel=1e-4)
    # The same dict passed to evaluate() gives the same numbers
    again = trainer.evaluate(eval_dataset=eval_sets)
    assert again["eval_plain_task_loss"] == pytest.approx(metrics["eval_plain_task_loss"], rel=1e-5)
    assert "eval_plain_align_loss" not in again and "eval_pairs_align_loss" in again


def test_predict_on_rows_without_pairs(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    tokenized = trainer.train_dataset.remove_columns(["parallel_source", "parallel_target"]).select(range(4))
    output = trainer.predict(tokenized)
    assert math.isfinite(output.metrics["test_loss"]) and output.predictions.shape[0] == 4


def test_training_collator_still_requires_pairs(tokenizer):
    collator = DataCollatorForAlignment(tokenizer, DataCollatorForLanguageModeling(tokenizer.pad_token_id))
    with pytest.raises(ValueError, match="no column 'parallel_source'.*alignment_dataset"):
        collator([{"input_ids": [1, 5, 6]}, {"input_ids": [1, 7]}])
    lenient = DataCollatorForAlignment(
        tokenizer, DataCollatorForLanguageModeling(tokenizer.pad_token_id), require_pairs=False
    )
    batch = lenient([{"input_ids": [1, 5, 6]}, {"input_ids": [1, 7]}])
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    with pytest.raises(ValueError, match="no column 'parallel_target'"):  # one side only is still an error
        lenient([{"input_ids": [1, 5], "parallel_source": "Danke"}, {"input_ids": [1, 7], "parallel_source": "Ja"}])


def test_eval_set_with_one_pair_column_names_the_missing_one(tmp_path, tokenizer):
    rows = task_rows(n=4)
    for row in rows:
        del row["parallel_target"]
    with pytest.raises(ValueError, match="has the pair column 'parallel_source' but not 'parallel_target'"):
        make_trainer(tmp_path, tokenizer, eval_dataset=Dataset.from_list(rows))


def test_alignment_only_refuses_an_eval_set_without_pairs(tmp_path, tokenizer, pair_dataset):
    trainer = make_trainer(
        tmp_path, tokenizer, train_dataset=None, alignment_dataset=pair_dataset, align_schedule="alignment_only"
    )
    with pytest.raises(ValueError, match="alignment_only.*the eval dataset has no 'parallel_source'"):
        trainer.evaluate(eval_dataset=Dataset.from_list(task_rows(n=4, with_pairs=False)))


def test_trailing_eval_batch_of_one_pair_is_evaluated_without_alignment(tmp_path, tokenizer, caplog):
    trainer = make_trainer(tmp_path, tokenizer)
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        metrics = trainer.evaluate(eval_dataset=Dataset.from_list(task_rows(n=5)))
    assert math.isfinite(metrics["eval_align_loss"]) and math.isfinite(metrics["eval_task_loss"])
    assert len(warnings_of(caplog, "single pair")) == 1


# --------------------------------------------------------------------------------------------------------------------
# 2. Pairs without any valid negative


@pytest.mark.parametrize(
    "pairs, side",
    [
        ([PAIRS[0]] * 8, "source"),  # every row the same pair
        ([(PAIRS[0][0], t) for _, t in PAIRS[:8]], "source"),  # one source, different targets
        ([(s, PAIRS[0][1]) for s, _ in PAIRS[:8]], "target"),  # one target, different sources
    ],
)
def test_pairs_that_can_never_have_a_negative_are_refused(tmp_path, tokenizer, pairs, side):
    with pytest.raises(ValueError, match=f"train dataset's 8 alignment pairs hold only 1 distinct {side} sentence"):
        make_trainer(tmp_path, tokenizer, rows_with_pairs(pairs))


def test_alignment_dataset_of_one_repeated_pair_is_refused(tmp_path, tokenizer):
    pairs = Dataset.from_list([{"parallel_source": PAIRS[1][0], "parallel_target": PAIRS[1][1]}] * 6)
    with pytest.raises(ValueError, match="alignment dataset's 6 alignment pairs hold only 1 distinct source"):
        make_trainer(tmp_path, tokenizer, task_rows(with_pairs=False), alignment_dataset=pairs)


def test_small_alignment_dataset_cycled_warns(tmp_path, tokenizer, caplog):
    pairs = Dataset.from_list([{"parallel_source": s, "parallel_target": t} for s, t in PAIRS[:2]])
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        make_trainer(tmp_path, tokenizer, task_rows(n=8, with_pairs=False), alignment_dataset=pairs)
    [message] = warnings_of(
        caplog, "only 2 distinct sources and 2 distinct targets, fewer than the 4 pairs of a batch"
    )
    assert message.startswith("The alignment dataset's")


def test_batches_without_a_negative_are_counted_and_warned(tmp_path, tokenizer, caplog):
    # 7 rows of one pair and 1 of another: whatever the shuffle, one of the 2 batches of an epoch holds only the
    # repeated pair (no negative), the other has negatives. Joint schedule: every step is an alignment step.
    rows = rows_with_pairs([PAIRS[0]] * 7 + [PAIRS[1]])
    trainer = make_trainer(tmp_path, tokenizer, rows, align_schedule="joint", max_steps=8)
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        trainer.train()
    steps = [log for log in trainer.state.log_history if "align_loss" in log]
    assert len(steps) == 8 and all("align_steps_without_negatives" in log for log in steps)
    counts = [log["align_steps_without_negatives"] for log in steps]
    assert sum(counts) == 4 and set(counts) == {0, 1}
    for log in steps:
        if log["align_steps_without_negatives"]:
            assert log["align_loss"] == 0.0
        else:
            assert log["align_loss"] > 0.0
    assert len(warnings_of(caplog, "1 of the 1 alignment batches since the last log had no valid negative")) == 4
    assert all_finite(trainer.model)


def test_eval_batches_without_a_negative_are_counted(tmp_path, tokenizer, caplog):
    trainer = make_trainer(tmp_path, tokenizer, per_device_eval_batch_size=2)
    eval_rows = rows_with_pairs([PAIRS[0], PAIRS[0], PAIRS[1], PAIRS[1]])  # sequential batches: [A, A], [B, B]
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        metrics = trainer.evaluate(eval_dataset=Dataset.from_list(eval_rows))
    assert metrics["eval_align_steps_without_negatives"] == 2
    assert metrics["eval_align_loss"] == 0.0
    assert warnings_of(caplog, "2 of the 2 alignment batches of this evaluation (eval) had no valid negative")


# --------------------------------------------------------------------------------------------------------------------
# 3. Settings: non-finite, out of range, wrong type; a loss that turns non-finite while training


@pytest.mark.parametrize(
    "setting, value, error, message",
    [
        ("align_temperature", float("nan"), ValueError, "align_temperature must be a finite number > 0, got nan"),
        ("align_temperature", float("inf"), ValueError, "align_temperature must be a finite number > 0, got inf"),
        ("align_temperature", 0.0, ValueError, "align_temperature must be a finite number > 0, got 0.0"),
        ("align_temperature", -0.1, ValueError, "align_temperature must be a finite number > 0"),
        ("align_temperature", "warm", ValueError, "align_temperature='warm' is not a number.*align_temperature=0.1"),
        ("align_temperature", None, TypeError, "align_temperature must be a number, got None"),
        ("align_temperature", True, TypeError, "align_temperature must be a number, got True"),
        ("align_weight", float("nan"), ValueError, "align_weight must be a finite number >= 0, got nan"),
        ("align_weight", float("-inf"), ValueError, "align_weight must be a finite number >= 0, got -inf"),
        ("align_weight", -1.0, ValueError, "align_weight must be a finite number >= 0, got -1.0"),
        ("align_weight", [1.0], TypeError, r"align_weight must be a number, got \[1.0\] \(list\)"),
        ("align_weight", 0.0, ValueError, "align_weight=0 with align_schedule='alternate'.*train nothing.*'joint'"),
        ("align_max_length", None, TypeError, "align_max_length=None.*no unlimited setting"),
        ("align_max_length", 12.5, TypeError, "align_max_length must be an int, got 12.5"),
        ("align_max_length", "long", ValueError, "align_max_length='long' is not an int"),
        ("align_max_length", 1, ValueError, "align_max_length must be >= 2 tokens, got 1"),
        ("align_auto_num_pairs", None, TypeError, "align_auto_num_pairs must be an int, got None"),
        ("align_layer", None, TypeError, "align_layer must be 'middle', 'auto'.*got None"),
        ("align_layer", float("nan"), ValueError, "align_layer=nan: a float is a fraction"),
        (
            "align_source_column",
            None,
            ValueError,
            "align_source_column must be the non-empty name of a dataset column",
        ),
        ("align_target_column", "", ValueError, "align_target_column must be the non-empty name"),
        ("align_target_column", "parallel_source", ValueError, "both 'parallel_source'"),
        ("align_schedule", "sometimes", ValueError, r"align_schedule='sometimes' is not supported; choose one of"),
        ("align_pooling", "max", ValueError, r"align_pooling='max' is not supported"),
    ],
)
def test_bad_settings_are_refused_with_their_name(tmp_path, setting, value, error, message):
    with pytest.raises(error, match=message):
        config(tmp_path, **{setting: value})


def test_zero_weight_measures_only_under_joint_and_a_huge_weight_warns(tmp_path, caplog):
    with pytest.raises(ValueError, match="align_weight=0 with align_schedule='alignment_only'"):
        config(tmp_path, align_weight=0, align_schedule="alignment_only")
    assert config(tmp_path, align_weight=0, align_schedule="joint").align_weight == 0.0
    with caplog.at_level(logging.WARNING, logger="trl_midalign.config"):
        config(tmp_path, align_weight=1e4)
    assert warnings_of(caplog, "align_weight=10000.0 is far above the usual 0.1-10")


def test_numeric_strings_are_converted_as_on_the_command_line(tmp_path):
    args = config(tmp_path, align_temperature="0.05", align_weight=" 2 ", align_max_length="64", align_layer="3")
    assert args.align_temperature == 0.05 and isinstance(args.align_temperature, float)
    assert args.align_weight == 2.0 and args.align_max_length == 64 and args.align_layer == 3


def test_overflowing_alignment_loss_stops_before_a_checkpoint_holds_it(tmp_path, tokenizer):
    # cosine / 1e-40 overflows float32: the alignment loss of the first alignment step (global step 2) is NaN
    trainer = make_trainer(tmp_path, tokenizer, max_steps=4, save_strategy="steps", save_steps=1)
    trainer.args.align_temperature = 1e-40  # past the config's range check, to reach the guard while training
    with pytest.raises(FloatingPointError, match="alignment loss is nan at global step 2") as raised:
        trainer.train()
    message = str(raised.value)
    assert "align_temperature=1e-40" in message and "checkpoint-1" in message
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all_finite(trainer.model)
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_diverging_update_is_not_written_into_a_checkpoint(tmp_path, tokenizer):
    # A learning rate that overflows float32 makes the first update inf: checkpoint-1 must not be written
    trainer = make_trainer(tmp_path, tokenizer, learning_rate=1e39, max_steps=3, save_strategy="steps", save_steps=1)
    with pytest.raises(FloatingPointError, match="hold NaN or inf after global step 1.*checkpoint-1 is not written"):
        trainer.train()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_diverging_weights_stop_at_the_next_loss(tmp_path, tokenizer):
    # A huge (but finite) learning rate: finite weights after step 1, a NaN loss at step 2, so no checkpoint-2
    trainer = make_trainer(tmp_path, tokenizer, learning_rate=1e30, max_steps=3, save_strategy="steps", save_steps=1)
    with pytest.raises(FloatingPointError, match="loss is nan at global step 2.*lower learning_rate"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]
    assert not any(torch.isnan(p).any() for p in trainer.model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# 4. Resuming: another schedule, broken or missing checkpoints, a corrupt state file


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer):
    """An alternate-schedule run of 2 steps with checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("finished") / "out"
    trainer = AlignmentTrainer(
        model=build_model("llama", len(tokenizer)),
        args=config(out.parent, output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=Dataset.from_list(task_rows()),
        processing_class=tokenizer,
    )
    trainer.train()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


def resume(tmp_path, tokenizer, checkpoint, **kwargs):
    kwargs.setdefault("max_steps", 3)
    trainer = make_trainer(tmp_path, tokenizer, save_strategy="steps", save_steps=1, **kwargs)
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def test_state_file_is_complete_and_written_atomically(run_copy):
    for step in (1, 2):
        folder = run_copy / f"checkpoint-{step}"
        state = json.loads((folder / "alignment_state.json").read_text())
        assert state == {"align_micro_step": step, "align_layer": 2, "align_schedule": "alternate"}
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_interrupted_state_write_leaves_the_old_file(tmp_path, monkeypatch):
    from trl_midalign import checkpoints

    path = tmp_path / "alignment_state.json"
    path.write_text('{"align_micro_step": 1, "align_layer": 2}')

    def dump_then_die(data, f):
        f.write('{"align_micro')
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(checkpoints.json, "dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_alignment_state(str(tmp_path), {"align_micro_step": 2, "align_layer": 2})
    assert path.read_text() == '{"align_micro_step": 1, "align_layer": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["alignment_state.json"]


def test_resume_with_another_schedule_is_refused(tmp_path, tokenizer, run_copy):
    before = folder_hash(run_copy)
    with pytest.raises(ValueError, match="align_schedule='alternate', but this run uses align_schedule='joint'"):
        resume(tmp_path, tokenizer, str(run_copy / "checkpoint-2"), align_schedule="joint")
    assert folder_hash(run_copy) == before


def test_resume_with_another_layer_is_refused(tmp_path, tokenizer, run_copy):
    with pytest.raises(ValueError, match="align_layer=2, but this run aligns layer 3; set align_layer=2"):
        resume(tmp_path, tokenizer, True, align_layer=3)


def test_resume_from_a_state_file_without_schedule_warns_and_continues(tmp_path, tokenizer, run_copy, caplog):
    path = run_copy / "checkpoint-2" / "alignment_state.json"
    path.write_text(json.dumps({"align_micro_step": 2, "align_layer": 2}))
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        trainer = resume(tmp_path, tokenizer, True)
    assert warnings_of(caplog, "does not record align_schedule")
    assert trainer.state.global_step == 3
    # step 3 continues the alternate phase: a task step, as micro-batch 2 (0-based) is a task micro-batch
    assert "task_loss" in [log for log in trainer.state.log_history if log.get("step") == 3 and "loss" in log][0]


@pytest.mark.parametrize("missing", ["alignment_state.json", "trainer_state.json"])
def test_resume_from_a_checkpoint_cut_short_names_the_newest_intact_one(tmp_path, tokenizer, run_copy, missing):
    os.remove(run_copy / "checkpoint-2" / missing)
    before = folder_hash(run_copy)
    intact = str(run_copy / "checkpoint-1")
    for checkpoint in (True, "true", str(run_copy / "checkpoint-2")):  # "true" as a command line passes it
        with pytest.raises(FileNotFoundError, match=f"checkpoint-2 has no {missing}") as raised:
            resume(tmp_path, tokenizer, checkpoint)
        assert "cut short" in str(raised.value)
        assert f"The newest intact checkpoint in {run_copy} is {intact}" in str(raised.value)
        assert f"resume_from_checkpoint={intact!r}" in str(raised.value)
    assert folder_hash(run_copy) == before
    trainer = resume(tmp_path, tokenizer, intact)  # the advice works
    assert trainer.state.global_step == 3


def test_resume_from_a_path_that_does_not_exist(tmp_path, tokenizer, run_copy):
    with pytest.raises(FileNotFoundError, match="checkpoint-7 does not exist.*newest intact checkpoint.*checkpoint-2"):
        resume(tmp_path, tokenizer, str(run_copy / "checkpoint-7"))


def test_resume_when_no_checkpoint_is_intact(tmp_path, tokenizer, run_copy):
    for step in (1, 2):
        os.remove(run_copy / f"checkpoint-{step}" / "alignment_state.json")
    with pytest.raises(FileNotFoundError, match="There is no intact checkpoint.*without resume_from_checkpoint"):
        resume(tmp_path, tokenizer, True)


def test_resume_true_without_any_checkpoint(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint=True, but output_dir .* holds no checkpoint-"):
        resume(tmp_path, tokenizer, True)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"align_micro_step": 2, "align_la', "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[2, 2]", "holds list, not the JSON object"),
        ('{"align_layer": 2}', "has no 'align_micro_step'"),
        ('{"align_micro_step": "two", "align_layer": 2}', "'align_micro_step' must be a non-negative int, got 'two'"),
    ],
)
def test_corrupt_state_file_names_the_file_and_the_fix(tmp_path, tokenizer, run_copy, content, message):
    path = run_copy / "checkpoint-2" / "alignment_state.json"
    path.write_text(content)
    before = folder_hash(run_copy)
    with pytest.raises(ValueError, match=message) as raised:
        resume(tmp_path, tokenizer, str(run_copy / "checkpoint-2"))
    assert str(path) in str(raised.value)
    assert f"The newest intact checkpoint in {run_copy} is {run_copy / 'checkpoint-1'}" in str(raised.value)
    assert folder_hash(run_copy) == before


def test_resume_from_an_sft_trainer_checkpoint_is_refused(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    out = tmp_path / "sft"
    SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(
            output_dir=str(out), max_steps=1, save_strategy="steps", save_steps=1, report_to="none", use_cpu=True
        ),
        train_dataset=Dataset.from_list(task_rows()),
        processing_class=tokenizer,
    ).train()
    with pytest.raises(FileNotFoundError, match="no alignment_state.json.*another trainer.*no intact checkpoint"):
        resume(tmp_path, tokenizer, str(out / "checkpoint-1"))


# --------------------------------------------------------------------------------------------------------------------
# 5. Rows dropped by TRL's preparation (max_length): checked on the prepared data, before training

LONG_PROMPT = " ".join(["Play some jazz"] * 8)  # 32 tokens: with max_length=16 the completion is cut off entirely


def test_rows_dropped_for_max_length_leaving_a_trailing_single_pair(tmp_path, tokenizer):
    rows = task_rows(n=10)
    rows[3]["prompt"] = LONG_PROMPT  # 10 rows given (fine for batches of 4), 9 after TRL drops this one
    with pytest.raises(
        ValueError, match=r"With 9 rows \(1 of the 10 rows given were dropped.*max_length=16.*holds a single pair"
    ):
        make_trainer(tmp_path, tokenizer, rows, max_length=16)
    trainer = make_trainer(tmp_path, tokenizer, rows, max_length=16, dataloader_drop_last=True)  # the fix
    assert len(trainer.train_dataset) == 9
    trainer.train()
    assert all_finite(trainer.model)


def test_all_rows_dropped_for_max_length(tmp_path, tokenizer):
    rows = task_rows(n=8)
    for row in rows:
        row["prompt"] = LONG_PROMPT
    with pytest.raises(
        ValueError, match="All 8 rows of the train dataset were dropped.*max_length=16.*Raise max_length"
    ):
        make_trainer(tmp_path, tokenizer, rows, max_length=16)


def test_all_eval_rows_dropped_for_max_length(tmp_path, tokenizer):
    eval_rows = task_rows(n=4)
    for row in eval_rows:
        row["prompt"] = LONG_PROMPT
    with pytest.raises(ValueError, match="All 4 rows of the eval dataset were dropped.*max_length=16"):
        make_trainer(tmp_path, tokenizer, max_length=16, eval_dataset=Dataset.from_list(eval_rows))


def test_drop_last_with_less_than_one_batch_left(tmp_path, tokenizer):
    rows = task_rows(n=4)
    rows[0]["prompt"] = LONG_PROMPT
    with pytest.raises(ValueError, match=r"has 3 rows \(1 of the 4 rows given.*fewer than one batch"):
        make_trainer(tmp_path, tokenizer, rows, max_length=16, dataloader_drop_last=True)


def test_empty_datasets_are_refused(tmp_path, tokenizer):
    empty = Dataset.from_list(task_rows(n=2)).select([])
    with pytest.raises(ValueError, match=r"The train dataset is empty \(0 rows\)"):
        make_trainer(tmp_path, tokenizer, train_dataset=empty)
    with pytest.raises(ValueError, match=r"The eval dataset is empty \(0 rows\)"):
        make_trainer(tmp_path, tokenizer, eval_dataset=empty)


# --------------------------------------------------------------------------------------------------------------------
# 6. An output_dir that already holds another run's checkpoints


def test_reused_output_dir_with_checkpoints_warns_before_training(tmp_path, tokenizer, run_copy, caplog):
    before = folder_hash(run_copy / "checkpoint-1")
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, save_total_limit=1)
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        trainer.train()
    [message] = warnings_of(caplog, "already holds 2 checkpoint folder(s) of an earlier run")
    assert str(run_copy) in message and "checkpoint-1, checkpoint-2" in message
    assert "save_total_limit=1" in message and "README.md" in message
    assert "new output_dir" in message and "resume_from_checkpoint=True" in message
    assert folder_hash(run_copy / "checkpoint-1") == before  # save_strategy="no": nothing was rotated here


def test_fresh_or_resumed_output_dir_does_not_warn(tmp_path, tokenizer, run_copy, caplog):
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        make_trainer(tmp_path / "fresh", tokenizer, max_steps=1).train()
        resume(tmp_path, tokenizer, True)
    assert not warnings_of(caplog, "of an earlier run")


# --------------------------------------------------------------------------------------------------------------------
# 7. Models that are not decoder-only causal LMs with real weights


def test_encoder_models_are_refused_by_name(tmp_path, tokenizer):
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
    )
    modern = ModernBertForMaskedLM(
        ModernBertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        )
    )
    for model in (bert, modern):
        name = type(model).__name__
        with pytest.raises(ValueError, match=f"{name} is not a causal LM: trl-midalign needs a decoder-only causal"):
            make_trainer(tmp_path, tokenizer, model=model)


def test_encoder_decoder_models_are_refused(tmp_path, tokenizer):
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
    )
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model.*decoder-only"):
        make_trainer(tmp_path, tokenizer, model=t5)


def test_meta_device_model_is_refused(tmp_path, tokenizer):
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama", len(tokenizer)))
    with pytest.raises(ValueError, match="LlamaForCausalLM has .* parameter.* on the meta device.*real, materialised"):
        make_trainer(tmp_path, tokenizer, model=model)


# --------------------------------------------------------------------------------------------------------------------
# 8. Cases that already gave clear errors


def test_missing_pair_columns(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="train dataset has no column 'parallel_source'.*alignment_dataset="):
        make_trainer(tmp_path, tokenizer, task_rows(with_pairs=False))
    with pytest.raises(ValueError, match="no column 'text_parallel_0'.*align_source_column"):
        make_trainer(tmp_path, tokenizer, align_source_column="text_parallel_0")


@pytest.mark.parametrize("bad, what", [(None, "holds None"), ("", "empty or whitespace"), ("  \t", "whitespace")])
def test_none_or_empty_sentences_name_row_and_column(tmp_path, tokenizer, bad, what):
    rows = task_rows()
    rows[6]["parallel_source"] = bad
    with pytest.raises(ValueError, match=f"Row 6 of the train dataset: column 'parallel_source' .*{what}.*filter"):
        make_trainer(tmp_path, tokenizer, rows)


def test_non_string_sentences_name_row_and_column(tmp_path, tokenizer):
    rows = task_rows()
    for i, row in enumerate(rows):
        row["parallel_target"] = i  # a column of ints
    with pytest.raises(ValueError, match=r"Row 0 of the train dataset: column 'parallel_target' holds 0 \(int\)"):
        make_trainer(tmp_path, tokenizer, rows)


def test_bad_sentences_in_the_alignment_and_eval_datasets(tmp_path, tokenizer):
    pairs = Dataset.from_list([{"parallel_source": s, "parallel_target": t} for s, t in PAIRS])
    pairs = pairs.map(lambda row, i: {"parallel_target": "" if i == 3 else row["parallel_target"]}, with_indices=True)
    with pytest.raises(ValueError, match="Row 3 of the alignment dataset: column 'parallel_target'"):
        make_trainer(tmp_path, tokenizer, task_rows(with_pairs=False), alignment_dataset=pairs)
    eval_rows = task_rows(n=4)
    eval_rows[2]["parallel_source"] = None
    with pytest.raises(ValueError, match="Row 2 of the eval dataset: column 'parallel_source'"):
        make_trainer(tmp_path, tokenizer, eval_dataset=Dataset.from_list(eval_rows))


def test_bad_sentences_of_an_iterable_dataset_are_named_by_the_collator(tmp_path, tokenizer, monkeypatch):
    rows = task_rows()
    rows[3]["parallel_target"] = "   "
    monkeypatch.setattr("trl_midalign.data.STREAM_CHECK_ROWS", 2)  # past the rows checked before training
    stream = IterableDataset.from_generator(lambda: iter(rows))
    trainer = make_trainer(tmp_path, tokenizer, train_dataset=stream)
    with pytest.raises(ValueError, match="Row 3 of the batch: column 'parallel_target' holds an empty"):
        trainer.train()


def test_batch_of_one_pair(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="per_device_train_batch_size=1.*at least 2 rows per batch"):
        config(tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="With 9 rows and per_device_train_batch_size=4.*single pair.*drop_last"):
        make_trainer(tmp_path, tokenizer, task_rows(n=9))
    with pytest.raises(ValueError, match="per_device_eval_batch_size=1.*at least 2 pairs per batch"):
        make_trainer(tmp_path, tokenizer, eval_dataset=Dataset.from_list(task_rows(n=4)), per_device_eval_batch_size=1)


def test_alignment_dataset_of_one_pair(tmp_path, tokenizer):
    pairs = Dataset.from_list([{"parallel_source": PAIRS[0][0], "parallel_target": PAIRS[0][1]}])
    with pytest.raises(ValueError, match="`alignment_dataset` has 1 pair.*at least 2"):
        make_trainer(tmp_path, tokenizer, task_rows(with_pairs=False), alignment_dataset=pairs)


@pytest.mark.parametrize(
    "layer, error, message",
    [
        (7, ValueError, "it has 4 decoder blocks"),
        (-9, ValueError, "it has 4 decoder blocks"),
        (0, ValueError, "embedding output"),
        (1.5, ValueError, r"must lie in \(0, 1\]"),
        ("top", ValueError, "align_layer='top' is not understood"),
    ],
)
def test_layer_outside_the_model(tmp_path, tokenizer, layer, error, message):
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, tokenizer, align_layer=layer)


def test_packing_a_streamed_dataset_is_refused_with_the_fix(tmp_path, tokenizer):
    streamed = IterableDataset.from_generator(lambda: iter(task_rows(n=8)))
    with pytest.raises(
        ValueError, match="packing=True with alignment pairs needs a map-style train dataset.*packing=False"
    ):
        make_trainer(tmp_path, tokenizer, train_dataset=streamed, packing=True, max_length=32, max_steps=1)


def test_padding_free_with_an_attention_that_mixes_sequences_is_refused(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    model.config._attn_implementation_internal = "my_kernel"
    with pytest.raises(ValueError, match="attn_implementation='my_kernel' is not known to keep them apart.*sdpa"):
        make_trainer(tmp_path, tokenizer, model=model, padding_free=True, max_length=None)


def test_gpt2_fails_clearly(tmp_path, tokenizer):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="decoder block stack of GPT2LMHeadModel.*GPT-2's `h`"):
        make_trainer(tmp_path, tokenizer, model=model)


def test_alignment_dataset_of_the_wrong_kind(tmp_path, tokenizer):
    as_list = [{"parallel_source": s, "parallel_target": t} for s, t in PAIRS]
    with pytest.raises(TypeError, match=r"alignment_dataset must be a datasets.Dataset or IterableDataset, got list"):
        make_trainer(tmp_path, tokenizer, task_rows(with_pairs=False), alignment_dataset=as_list)
    stream = IterableDataset.from_generator(lambda: iter(task_rows(with_pairs=False)))
    with pytest.raises(TypeError, match="needs a map-style `train_dataset`.*got IterableDataset"):
        make_trainer(tmp_path, tokenizer, train_dataset=stream, alignment_dataset=Dataset.from_list(as_list))
    with pytest.raises(ValueError, match="already has the pair column 'parallel_source'.*keep the pairs in one place"):
        make_trainer(tmp_path, tokenizer, alignment_dataset=Dataset.from_list(as_list))


def test_ddp_without_unused_parameter_search_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True.*align_schedule='joint'"):
        make_trainer(tmp_path, tokenizer, ddp_find_unused_parameters=False)


def test_check_pairs_is_one_policy_for_datasets_rows_and_packed_rows():
    rows = [{"src": "Danke", "tgt": "Thanks"}, {"src": ["Ja", "Nein"], "tgt": ["Yes", 3]}]
    with pytest.raises(
        ValueError, match=r"Row 1 of the file pairs.jsonl \(its pair 1\): column 'tgt' holds 3 \(int\)"
    ):
        check_pairs(rows, "src", "tgt", "file pairs.jsonl")
    with pytest.raises(ValueError, match="Row 1 of the train dataset: column 'src' holds an empty"):
        check_pairs(
            Dataset.from_list([{"src": "Ja", "tgt": "Yes"}, {"src": " ", "tgt": "No"}]), "src", "tgt", "train dataset"
        )
    with pytest.raises(ValueError, match=r"The batch has no column 'tgt' .*\(its columns: \['src'\]\)\. Use --tgt"):
        check_pairs([{"src": "Ja"}], "src", "tgt", "batch", fix="Use --{target}.")
    stream = IterableDataset.from_generator(lambda: iter([{"src": "", "tgt": "x"}]))
    with pytest.raises(ValueError, match="Row 0 of the train dataset stream: column 'src' holds an empty"):
        check_pairs(stream, "src", "tgt", "train dataset")  # the first rows of a stream are read and checked
    check_pairs(rows[:1], "src", "tgt", "batch")  # good pairs pass


# --------------------------------------------------------------------------------------------------------------------
# 9. Third round: streamed sets, containers, identical sides, absurd settings, output folders, a full disk


def stream_of(rows):
    return IterableDataset.from_generator(lambda: iter(rows))


def test_streamed_eval_set_evaluates_like_a_dataset(tmp_path, tokenizer, caplog):
    # Whole batches: with a trailing partial batch transformers weighs eval_loss by rows for a Dataset only
    eval_rows = task_rows(n=8)
    with caplog.at_level(logging.WARNING, logger="trl_midalign.data"):
        trainer = make_trainer(tmp_path, tokenizer, eval_dataset=stream_of(eval_rows))
    assert not warnings_of(caplog, "has no alignment pairs")  # the stream's pair columns are seen
    streamed = trainer.evaluate()
    in_memory = trainer.evaluate(eval_dataset=Dataset.from_list(eval_rows))
    for key in ("eval_loss", "eval_task_loss", "eval_align_loss"):
        assert streamed[key] == pytest.approx(in_memory[key], rel=1e-5), key
    again = trainer.evaluate(eval_dataset=stream_of(eval_rows))  # a stream passed to evaluate()
    assert again["eval_align_loss"] == pytest.approx(in_memory["eval_align_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="dispatch_batches=True with a streamed.*set it to False"):
        make_trainer(
            tmp_path, tokenizer, eval_dataset=stream_of(eval_rows), accelerator_config={"dispatch_batches": True}
        )


def test_streamed_train_set_of_one_repeated_pair_is_refused(tmp_path, tokenizer):
    rows = rows_with_pairs([PAIRS[0]] * 12)
    with pytest.raises(ValueError, match="train stream's 12 alignment pairs hold only 1 distinct source.*exactly 0.0"):
        make_trainer(tmp_path, tokenizer, train_dataset=stream_of(rows))
    with pytest.raises(ValueError, match="eval stream's 12 alignment pairs hold only 1 distinct source"):
        make_trainer(tmp_path, tokenizer, eval_dataset=stream_of(rows))


@pytest.mark.parametrize("bad, what", [(None, "holds None"), ("  ", "holds an empty or whitespace")])
def test_streamed_bad_pair_names_the_row_of_the_stream(tmp_path, tokenizer, bad, what):
    rows = task_rows(n=12)
    rows[9]["parallel_target"] = bad
    with pytest.raises(ValueError, match=f"Row 9 of the train dataset stream: column 'parallel_target' {what}"):
        make_trainer(tmp_path, tokenizer, train_dataset=stream_of(rows))


def test_streamed_set_without_pair_columns_lists_the_users_columns(tmp_path, tokenizer):
    rows = task_rows(n=8, with_pairs=False)
    with pytest.raises(
        ValueError, match=r"train dataset stream has no column 'parallel_source'.*\['prompt', 'completion'\]"
    ):
        make_trainer(tmp_path, tokenizer, train_dataset=stream_of(rows))
    with pytest.raises(ValueError, match="stream yields no rows"):
        make_trainer(tmp_path, tokenizer, train_dataset=stream_of([]))


def test_pairs_with_identical_sides_are_refused_or_warned(tmp_path, tokenizer, caplog):
    same = [(t, t) for _, t in PAIRS]  # the English side in both columns
    with pytest.raises(
        ValueError, match=r"12 of 12 \(100%\) have the same text in 'parallel_source' and 'parallel_target'"
    ):
        make_trainer(tmp_path, tokenizer, rows_with_pairs(same))
    eleven = same[:11] + PAIRS[11:]
    with pytest.raises(ValueError, match=r"11 of 12 \(92%\).*Point the source column.*align_source_column"):
        make_trainer(tmp_path, tokenizer, rows_with_pairs(eleven))
    with pytest.raises(ValueError, match="same text"):
        make_trainer(tmp_path, tokenizer, train_dataset=stream_of(rows_with_pairs(same)))
    pairs = Dataset.from_list([{"parallel_source": s, "parallel_target": t} for s, t in same])
    with pytest.raises(ValueError, match="alignment dataset's 12 alignment pairs: 12 of 12"):
        make_trainer(tmp_path, tokenizer, task_rows(with_pairs=False), alignment_dataset=pairs)
    two = same[:2] + PAIRS[2:]
    with caplog.at_level(logging.WARNING, logger="trl_midalign.data"):
        trainer = make_trainer(tmp_path, tokenizer, rows_with_pairs(two))
    assert warnings_of(caplog, "2 of 12 (17%) have the same text")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_midalign.data"):
        make_trainer(tmp_path, tokenizer)
    assert not warnings_of(caplog, "same text")
    assert trainer.train().training_loss > 0  # a warning only: it trains


@pytest.mark.parametrize("value, word", [(1e-9, "explode"), (0.005, "explode"), (50.0, "nearly flat"), (1e6, "flat")])
def test_absurd_temperature_is_refused_naming_the_usual_values(tmp_path, value, word):
    with pytest.raises(
        ValueError, match=rf"align_temperature={value} is outside the sane range \[0.01, 10.0\].*{word}.*0.05-1"
    ):
        config(tmp_path, align_temperature=value)
    for fine in (0.01, 0.05, 1.0, 10.0):
        assert config(tmp_path, align_temperature=fine).align_temperature == fine


def test_dataset_dicts_and_other_containers_name_the_fix(tmp_path, tokenizer, pair_dataset):
    from datasets import DatasetDict

    splits = DatasetDict({"train": Dataset.from_list(task_rows()), "test": Dataset.from_list(task_rows(n=4))})
    with pytest.raises(
        TypeError, match=r"train_dataset is a DatasetDict of the splits \['train', 'test'\].*dataset\['train'\]"
    ):
        make_trainer(tmp_path, tokenizer, train_dataset=splits)
    with pytest.raises(TypeError, match=r"eval_dataset is a DatasetDict.*dataset\['train'\].*plain dict"):
        make_trainer(tmp_path, tokenizer, eval_dataset=splits)
    with pytest.raises(TypeError, match="alignment_dataset is a DatasetDict"):
        make_trainer(
            tmp_path, tokenizer, task_rows(with_pairs=False), alignment_dataset=DatasetDict({"train": pair_dataset})
        )
    with pytest.raises(
        TypeError,
        match=r"train_dataset must be a datasets.Dataset or IterableDataset, got list.*Dataset.from_list\(rows\)",
    ):
        make_trainer(tmp_path, tokenizer, train_dataset=task_rows())
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(task_rows())
    with pytest.raises(TypeError, match=r"got DataFrame.*Dataset.from_pandas\(frame\)"):
        make_trainer(tmp_path, tokenizer, train_dataset=frame)
    with pytest.raises(TypeError, match=r"eval_dataset 'dev' must be .*got DataFrame"):
        make_trainer(tmp_path, tokenizer, eval_dataset={"dev": frame})


def test_output_dir_that_is_a_file_is_refused_before_training(tmp_path, tokenizer):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"output_dir {existing}: {existing} is an existing file"):
        AlignmentTrainer(
            model=build_model("llama", len(tokenizer)),
            args=alignment_config(existing),
            train_dataset=Dataset.from_list(task_rows()),
            processing_class=tokenizer,
        )
    with pytest.raises(NotADirectoryError, match=f"{existing} is an existing file.*would lie inside it"):
        AlignmentTrainer(
            model=build_model("llama", len(tokenizer)),
            args=alignment_config(existing / "run"),
            train_dataset=Dataset.from_list(task_rows()),
            processing_class=tokenizer,
        )
    assert existing.read_text() == "mine"


class _SecondRunInTheSameFolder(TrainerCallback):
    """Starts a second run in the same output_dir while the first one trains."""

    def __init__(self, start):
        self.start, self.error = start, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            try:
                self.start().train()
            except RuntimeError as error:
                self.error = error


def test_second_run_in_the_same_output_dir_is_refused(tmp_path, tokenizer):
    second = _SecondRunInTheSameFolder(lambda: make_trainer(tmp_path, tokenizer, align_layer=1))
    first = make_trainer(tmp_path, tokenizer, max_steps=2)
    first.add_callback(second)
    first.train()
    message = str(second.error)
    assert f"output_dir {tmp_path / 'out'} is in use by another training run (pid {os.getpid()} on host" in message
    assert "own output_dir" in message
    lock = tmp_path / "out" / "_trl-midalign.lock"
    assert not lock.exists()  # released at the end of the first run
    assert make_trainer(tmp_path, tokenizer, max_steps=1).train().global_step == 1  # a later run in the folder works
    failing = make_trainer(tmp_path, tokenizer, learning_rate=1e39, max_steps=3, save_strategy="steps", save_steps=1)
    with pytest.raises(FloatingPointError):
        failing.train()
    assert not lock.exists()  # released on an exception too


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, tokenizer, caplog):
    script = (
        "import os, signal, sys\n"
        "sys.path[:0] = [{tests!r}, {root!r}]\n"
        "from datasets import Dataset\n"
        "from testing_utils import alignment_config, build_model, build_tokenizer, task_rows\n"
        "from transformers import TrainerCallback\n"
        "from trl_midalign import AlignmentTrainer\n"
        "class Kill(TrainerCallback):\n"
        "    def on_step_end(self, *args, **kwargs):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "tokenizer = build_tokenizer()\n"
        "AlignmentTrainer(model=build_model('llama', len(tokenizer)), args=alignment_config({out!r}), "
        "train_dataset=Dataset.from_list(task_rows()), processing_class=tokenizer, callbacks=[Kill()]).train()\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    code = script.format(tests=tests, root=os.path.dirname(tests), out=str(tmp_path / "out"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    lock = tmp_path / "out" / "_trl-midalign.lock"
    assert json.loads(lock.read_text())["pid"] != os.getpid()
    with caplog.at_level(logging.WARNING, logger="trl_midalign.checkpoints"):
        assert make_trainer(tmp_path, tokenizer, max_steps=1).train().global_step == 1
    assert warnings_of(caplog, "is no longer running (killed or crashed): taking the lock over")
    assert not lock.exists()


def _tmpfs(path) -> bool:
    path.mkdir()
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


class _FillTheDisk(TrainerCallback):
    """After the first checkpoint, fill the filesystem of output_dir (all but 64 KiB), as another process might."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            free = shutil.disk_usage(args.output_dir).free
            with open(os.path.join(args.output_dir, "filler"), "wb") as f:
                f.write(b"\0" * max(0, free - 64 * 1024))


@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_full_disk_while_saving_names_the_path_and_the_incomplete_checkpoint(tmp_path, tokenizer, monkeypatch, disk):
    out = tmp_path / "out"
    if disk == "tmpfs":
        if not _tmpfs(out):
            pytest.skip("mounting a small tmpfs needs root")
        callbacks = [_FillTheDisk()]
    else:  # the lowest file write transformers makes for the weights fails as on a full disk, from checkpoint-2 on
        import transformers.modeling_utils as modeling_utils

        real = modeling_utils.safe_save_file

        def full_disk(tensors, filename, *args, **kwargs):
            if "checkpoint-1" in str(filename):
                return real(tensors, filename, *args, **kwargs)
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)  # a partial file, as a full disk leaves it
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
        callbacks = []
    try:
        trainer = make_trainer(tmp_path, tokenizer, max_steps=3, save_strategy="steps", save_steps=1)
        for callback in callbacks:
            trainer.add_callback(callback)
        with pytest.raises(
            OSError,
            match=f"No space left on the device of {out} while saving {out / 'checkpoint-2'}: that checkpoint is incomplete",
        ) as raised:
            trainer.train()
        assert raised.value.errno == 28
        assert f"The newest intact checkpoint in {out} is {out / 'checkpoint-1'}" in str(raised.value)
        assert not (out / "_trl-midalign.lock").exists()
        if disk == "tmpfs":
            os.remove(out / "filler")
        monkeypatch.undo()
        with pytest.raises(FileNotFoundError, match="checkpoint-2 has no"):
            make_trainer(tmp_path, tokenizer, max_steps=3).train(resume_from_checkpoint=True)
        resumed = make_trainer(tmp_path, tokenizer, max_steps=3)
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
        assert resumed.state.global_step == 3
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(out)], capture_output=True)


def test_auto_layer_from_indistinguishable_scores_is_refused(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # every state is 0: nothing can be retrieved at any layer
    with pytest.raises(ValueError, match="align_layer='auto' probed 8 training pairs. No layer can be recommended"):
        make_trainer(tmp_path, tokenizer, model=model, align_layer="auto")


def test_auto_layer_on_a_streamed_train_set_probes_its_first_pairs(tmp_path, tokenizer):
    from trl_midalign.probing import probe_layers

    rows = task_rows(n=12)
    model = build_model("llama", len(tokenizer))
    expected = probe_layers(model, tokenizer, rows[:5], show_progress=False).recommended_layer
    trainer = make_trainer(
        tmp_path, tokenizer, model=model, train_dataset=stream_of(rows), align_layer="auto", align_auto_num_pairs=5
    )
    assert trainer.align_probe.num_pairs == {"all": 5}
    assert trainer.align_layer == expected


def test_evaluate_refuses_a_dataset_dict_passed_in(tmp_path, tokenizer):
    from datasets import DatasetDict

    trainer = make_trainer(tmp_path, tokenizer)
    splits = DatasetDict({"validation": Dataset.from_list(task_rows(n=4)), "test": Dataset.from_list(task_rows(n=4))})
    with pytest.raises(TypeError, match=r"eval_dataset is a DatasetDict of the splits \['validation', 'test'\]"):
        trainer.evaluate(eval_dataset=splits)
