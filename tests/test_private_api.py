"""The private attributes of TRL and transformers that trl-midalign relies on (docs/architecture.md lists them).

Each is checked by name, so that an upgrade that renames or removes one fails here, naming it, rather than somewhere
deep in a training step.
"""

import importlib
import inspect

import pytest
from datasets import Dataset
from testing_utils import alignment_config, build_model, build_tokenizer, task_rows
from transformers import Trainer
from trl import SFTTrainer


# (module, attribute, what trl-midalign does with it)
MODULE_ATTRIBUTES = [
    ("trl.models.utils", "_ForwardRedirection", "runs the alignment forward inside one forward of the outer wrapper"),
    (
        "trl.kernels.chunked_logprob",
        "_use_triton",
        "keeps TRL's fused head where it already projects only label positions",
    ),
]
# (class, method, what trl-midalign does with it): overridden or called
METHODS = [
    (Trainer, "_save_checkpoint", "overridden: the weight scan before, alignment_state.json after"),
    (Trainer, "_get_output_dir", "called: the folder of the checkpoint just written"),
    (Trainer, "_get_num_items_in_batch", "called: the task tokens of the task micro-batches of a window"),
    (Trainer, "_set_signature_columns_if_needed", "extended: the pair columns survive remove_unused_columns"),
    (SFTTrainer, "_prepare_dataset", "overridden: packing that keeps each packed row's pairs"),
]
# Attributes of a built trainer: (attribute, what trl-midalign does with it)
INSTANCE_ATTRIBUTES = [
    ("_metrics", "SFTTrainer's metric lists per mode: task_loss and align_loss are appended, eval sets renamed"),
    ("_tokenizer", "SFTTrainer's tokenizer of the processing class: the pairs are tokenized with it"),
    ("padding_free", "SFTTrainer's resolved padding-free flag: the attention implementation is checked for it"),
    ("loss_is_scaled_for_ga", "Trainer's flag: whether the returned loss is already divided over the window"),
    ("model_accepts_loss_kwargs", "Trainer's flag: the same decision as Trainer.training_step"),
    ("_signature_columns", "Trainer's kept columns, set by _set_signature_columns_if_needed"),
    ("_total_train_tokens", "SFTTrainer's token count: the label-positions task loss adds to it (num_tokens)"),
    ("_tp_size", "SFTTrainer's tensor-parallel size: num_tokens is divided by it, as TRL does"),
    ("aux_loss_enabled", "SFTTrainer's router auxiliary loss flag: the label-positions task loss falls back to TRL's"),
]


@pytest.mark.parametrize("module, name, use", MODULE_ATTRIBUTES, ids=[a[1] for a in MODULE_ATTRIBUTES])
def test_module_attribute_exists(module, name, use):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone; trl-midalign {use}."


@pytest.mark.parametrize("owner, name, use", METHODS, ids=[m[1] for m in METHODS])
def test_method_exists(owner, name, use):
    assert callable(getattr(owner, name, None)), f"{owner.__name__}.{name} is gone; trl-midalign {use}."


def test_base_trainer_reads_the_model_card_attributes():
    # TRL's model card reads the trainer's `_tag_names`, `_name` and `_paper` (the paper and its citation)
    source = inspect.getsource(importlib.import_module("trl.trainer.base_trainer"))
    for name in ("_tag_names", "_name", "_paper"):
        assert name in source, f"trl's BaseTrainer no longer reads {name}: AlignmentTrainer's model card loses it."


def test_instance_attributes_exist(tmp_path):
    from trl_midalign import AlignmentTrainer

    trainer = AlignmentTrainer(
        model=build_model(),
        args=alignment_config(tmp_path),
        train_dataset=Dataset.from_list(task_rows()),
        processing_class=build_tokenizer(),
    )
    trainer._set_signature_columns_if_needed()
    missing = [f"{name} ({use})" for name, use in INSTANCE_ATTRIBUTES if not hasattr(trainer, name)]
    assert not missing, f"A trainer no longer has: {missing}"
    assert isinstance(trainer._metrics["train"], dict), "SFTTrainer._metrics is no longer a dict of lists per mode"
    assert "parallel_source" in trainer._signature_columns
