"""The task loss with the LM head only on the label positions (`task_loss.py`) equals TRL's, and falls back to TRL's
fused head, with one info line, where it cannot be exact.

Compared: the same task micro-batch through `trl.SFTTrainer.compute_loss` (TRL's fused head, which on the CPU projects
every position) and through `AlignmentTrainer.compute_loss`, with the same weights; both against a plain-torch loss
from the full logits. Loss tolerance 1e-6 relative, gradients 1e-5 relative / 1e-6 absolute (float32: the two heads
sum the same terms in another order).
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from test_fast_paths import long_rows
from testing_utils import build_model
from transformers import LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from trl_midalign import AlignmentConfig, AlignmentTrainer, LabelsOnlySFTTrainer
from trl_midalign.task_loss import label_positions


LAYOUTS = {
    "padded": dict(max_length=None),
    "padding_free": dict(max_length=None, padding_free=True),
    "packing": dict(packing=True, max_length=48),
}


def settings(tmp_path, **kwargs) -> dict:
    values = dict(
        output_dir=str(tmp_path), max_steps=2, logging_steps=1, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, use_cpu=True, seed=0,
        dataloader_drop_last=True, optim="sgd",
    )  # fmt: skip
    values.update(kwargs)
    return values


def build(kind, tokenizer, softcap=None):
    model = build_model(kind, len(tokenizer))
    if softcap is not None:
        model.config.final_logit_softcapping = softcap
    return model


def sft_trainer(tmp_path, model, tokenizer, **kwargs) -> SFTTrainer:
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in long_rows()]
    return SFTTrainer(
        model=model, args=SFTConfig(**settings(tmp_path / "sft", **kwargs)), train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip


def alignment_trainer(tmp_path, model, tokenizer, **kwargs) -> AlignmentTrainer:
    return AlignmentTrainer(
        model=model, args=AlignmentConfig(**settings(tmp_path / "align", **kwargs)),
        train_dataset=Dataset.from_list(long_rows()), processing_class=tokenizer,
    )  # fmt: skip


def plain_loss(model, batch, num_items) -> torch.Tensor:
    """The summed next-token cross-entropy from every position's logits, divided by `num_items`."""
    forward = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**forward, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum") / num_items


def loss_and_grads(trainer, model, batch, num_items_in_batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind, softcap", [("llama", None), ("qwen2", None), ("gemma3", 3.0)])
def test_loss_gradients_and_metrics_equal_trl(tmp_path, tokenizer, kind, softcap, layout):
    """Gemma 3 with final-logit soft-capping (3.0, so that it bends the logits of a random model); with and without
    `num_items_in_batch` (gradient accumulation: the window's label tokens, here 3x this micro-batch's)."""
    sft = sft_trainer(tmp_path, build(kind, tokenizer, softcap), tokenizer, **LAYOUTS[layout])
    ours = alignment_trainer(tmp_path, build(kind, tokenizer, softcap), tokenizer, **LAYOUTS[layout])
    assert ours._labels_only_head_reason is None
    batch = next(iter(ours.get_train_dataloader()))  # micro-step 0 of the alternate schedule: a task step
    task_batch = {k: v for k, v in batch.items() if not k.startswith("align_")}
    if layout == "padding_free":
        assert task_batch["input_ids"].size(0) == 1 and "attention_mask" not in task_batch
    positions = label_positions(task_batch["labels"])
    assert 0 < positions.sum() < 0.6 * positions.numel()  # the head really skips the prompt positions
    ours.model.train(), sft.model.train()

    label_tokens = int(positions.sum())
    for num_items in (None, torch.tensor(3 * label_tokens)):
        ours._align_micro_step = 0
        mine, my_grads, my_metrics = loss_and_grads(ours, ours.model, batch, num_items)
        theirs, their_grads, their_metrics = loss_and_grads(sft, sft.model, task_batch, num_items)
        reference = plain_loss(sft.model, task_batch, label_tokens if num_items is None else num_items)
        assert mine.item() == pytest.approx(theirs.item(), rel=1e-6)
        assert mine.item() == pytest.approx(reference.item(), rel=1e-6)
        assert my_grads.keys() == their_grads.keys() and my_grads
        for name, grad in my_grads.items():
            torch.testing.assert_close(
                grad, their_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
        for key in ("entropy", "mean_token_accuracy"):
            assert my_metrics[key] == pytest.approx(their_metrics[key], rel=1e-5), key
        assert my_metrics["num_tokens"] == their_metrics["num_tokens"]


def test_training_with_accumulation_logs_what_trl_logs(tmp_path, tokenizer):
    """Two optimizer steps of 3 accumulated micro-batches (joint schedule: every micro-batch has a task loss) with the
    label-positions head and with TRL's head: the same logged losses and metrics, the same weights after."""
    runs = {}
    for on in (True, False):
        trainer = alignment_trainer(
            tmp_path / str(on), build("gemma3", tokenizer, 3.0), tokenizer, gradient_accumulation_steps=3,
            per_device_train_batch_size=2, align_schedule="joint", lm_head_on_labels_only=on,
        )  # fmt: skip
        assert (trainer._labels_only_head_reason is None) == on
        before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
        trainer.train()
        after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        assert not torch.allclose(before, after)
        runs[on] = ([log for log in trainer.state.log_history if "loss" in log], after)
    (logs, weights), (trl_logs, trl_weights) = runs[True], runs[False]
    assert len(logs) == len(trl_logs) == 2
    for mine, theirs in zip(logs, trl_logs):
        for key in ("loss", "task_loss", "align_loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (key, mine, theirs)
    torch.testing.assert_close(weights, trl_weights, rtol=1e-5, atol=1e-6)


def test_a_micro_batch_without_labels_gives_a_differentiable_zero(tmp_path, tokenizer):
    trainer = alignment_trainer(tmp_path, build("llama", tokenizer), tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert trainer._metrics["train"]["mean_token_accuracy"] == [0.0]


class LogitsOfEveryPosition(LlamaForCausalLM):
    """A model whose forward accepts `logits_to_keep` but ignores it."""

    def forward(self, *args, logits_to_keep=0, **kwargs):
        return super().forward(*args, **kwargs)


class NoLogitsToKeep(LlamaForCausalLM):
    """A model whose forward has no `logits_to_keep` parameter."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               labels=labels, use_cache=use_cache)  # fmt: skip


def fallback_case(tmp_path, tokenizer, name):
    """(trainer, expected reason pattern) for one fallback case."""
    if name == "ignores_logits_to_keep":
        model = LogitsOfEveryPosition(build("llama", tokenizer).config)
        return alignment_trainer(tmp_path, model, tokenizer), None
    if name == "no_logits_to_keep":
        model = NoLogitsToKeep(build("llama", tokenizer).config)
        return alignment_trainer(tmp_path, model, tokenizer), "NoLogitsToKeep.forward takes no logits_to_keep"
    if name == "compute_loss_func":

        def my_loss(outputs, labels, num_items_in_batch=None):
            logits = outputs.logits[:, :-1]
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)) * 2.0

        trainer = AlignmentTrainer(
            model=build("llama", tokenizer), args=AlignmentConfig(**settings(tmp_path)),
            train_dataset=Dataset.from_list(long_rows()), processing_class=tokenizer, compute_loss_func=my_loss,
        )  # fmt: skip
        return trainer, "a compute_loss_func is set"
    if name == "label_smoothing":
        return alignment_trainer(tmp_path, build("llama", tokenizer), tokenizer, label_smoothing_factor=0.1), (
            "label_smoothing_factor=0.1"
        )
    if name == "dft":
        return alignment_trainer(tmp_path, build("llama", tokenizer), tokenizer, loss_type="dft"), "loss_type='dft'"
    raise ValueError(name)


@pytest.mark.parametrize(
    "name", ["no_logits_to_keep", "compute_loss_func", "label_smoothing", "dft", "ignores_logits_to_keep"]
)
def test_unsupported_cases_fall_back_to_trl_with_one_info_line(tmp_path, tokenizer, caplog, name):
    """Each falls back to `SFTTrainer.compute_loss` (the loss is TRL's, whatever it computes) and says why once."""
    with caplog.at_level(logging.INFO, logger="trl_midalign"):
        trainer, reason = fallback_case(tmp_path, tokenizer, name)
        batch = next(iter(trainer.get_train_dataloader()))
        task_batch = {k: v for k, v in batch.items() if not k.startswith("align_")}
        trainer.model.train()
        losses = []
        for _ in range(2):
            trainer._align_micro_step = 0
            losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
        expected = SFTTrainer.compute_loss(trainer, trainer.model, dict(task_batch)).item()
    lines = [r.getMessage() for r in caplog.records if "TRL's fused LM head" in r.getMessage()]
    assert len(lines) == 1, lines
    if reason is None:  # found out at the first call, from the shape of the logits
        assert "returned logits for other positions" in lines[0]
    else:
        assert reason in lines[0] and reason in trainer._labels_only_head_reason
    assert losses == [pytest.approx(expected, rel=1e-6)] * 2
    if name == "compute_loss_func":  # the user's function really computed it (twice the mean)
        logits = trainer.model(input_ids=task_batch["input_ids"], attention_mask=task_batch["attention_mask"]).logits
        mean = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), task_batch["labels"][:, 1:].reshape(-1))
        assert losses[0] == pytest.approx(2.0 * mean.item(), rel=1e-5)


def test_turned_off_says_nothing_and_uses_trl(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="trl_midalign"):
        trainer = alignment_trainer(tmp_path, build("llama", tokenizer), tokenizer, lm_head_on_labels_only=False)
    assert trainer._labels_only_head_reason == "lm_head_on_labels_only=False"
    assert not [r for r in caplog.records if "TRL's fused LM head" in r.getMessage()]


def test_a_copy_of_a_model_trl_set_up_trains_the_copy(tmp_path, tokenizer, caplog):
    """A deepcopy of `trainer.model` keeps, in TRL's fused head, the original's forward: the copy's trainer must not
    call it (its optimizer would step the copy, which got no gradients, while the original's weights did the work)."""
    first = alignment_trainer(tmp_path / "first", build("llama", tokenizer), tokenizer)
    model = copy.deepcopy(first.model)
    original = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="trl_midalign"):
        trainer = alignment_trainer(tmp_path / "second", model, tokenizer)
    assert "runs another model's forward" in trainer._labels_only_head_reason
    assert [r for r in caplog.records if "copy.deepcopy" in r.getMessage()]
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(original[n], p) for n, p in first.model.named_parameters())
    assert first.model.model.embed_tokens.weight.grad is None
    assert trainer.state.log_history[0]["task_loss"] > 0
    # A model set up once is not a copy
    assert first._labels_only_head_reason is None


@pytest.mark.parametrize("layout", ["padded", "padding_free"])
def test_labels_only_sft_trainer_is_sft_with_the_labels_only_head(tmp_path, tokenizer, layout):
    """`LabelsOnlySFTTrainer` (an SFTConfig, no pairs) against `SFTTrainer` on the same micro-batch: the same loss as
    plain torch's, the same gradients and metrics; then both train 2 steps of accumulation 2 from the same weights and
    log the same losses and end with the same (changed) weights."""
    rows = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in long_rows()])
    config = dict(LAYOUTS[layout], gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainers = {}
    for name, cls in (("sft", SFTTrainer), ("ours", LabelsOnlySFTTrainer)):
        args = SFTConfig(**settings(tmp_path / name, **config))
        trainers[name] = cls(
            model=build("gemma3", tokenizer, 3.0), args=args, train_dataset=rows, processing_class=tokenizer
        )
    sft, ours = trainers["sft"], trainers["ours"]
    ours.model.load_state_dict(sft.model.state_dict())
    assert ours._labels_only_head_reason is None
    batch = next(iter(ours.get_train_dataloader()))
    positions = label_positions(batch["labels"])
    assert 0 < positions.sum() < 0.6 * positions.numel()
    ours.model.train(), sft.model.train()
    num_items = torch.tensor(2 * int(positions.sum()))
    mine, my_grads, my_metrics = loss_and_grads(ours, ours.model, batch, num_items)
    theirs, their_grads, their_metrics = loss_and_grads(sft, sft.model, batch, num_items)
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert mine.item() == pytest.approx(plain_loss(sft.model, batch, num_items).item(), rel=1e-6)
    assert my_grads.keys() == their_grads.keys() and my_grads
    for name, grad in my_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-5, atol=1e-6)
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert my_metrics[key] == pytest.approx(their_metrics[key], rel=1e-5), key

    results = {}
    for name, trainer in trainers.items():
        trainer._total_train_tokens = 0
        before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
        trainer.train()
        after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        assert not torch.allclose(before, after)
        results[name] = ([log for log in trainer.state.log_history if "loss" in log], after)
    (logs, weights), (sft_logs, sft_weights) = results["ours"], results["sft"]
    assert len(logs) == len(sft_logs) == 2
    for mine, theirs in zip(logs, sft_logs):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (key, mine, theirs)
    torch.testing.assert_close(weights, sft_weights, rtol=1e-5, atol=1e-6)


def test_labels_only_sft_trainer_falls_back_to_trl_with_one_info_line(tmp_path, tokenizer, caplog):
    rows = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in long_rows()])
    with caplog.at_level(logging.INFO, logger="trl_midalign"):
        trainer = LabelsOnlySFTTrainer(
            model=build("llama", tokenizer), args=SFTConfig(**settings(tmp_path, label_smoothing_factor=0.1)),
            train_dataset=rows, processing_class=tokenizer,
        )  # fmt: skip
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert loss == pytest.approx(SFTTrainer.compute_loss(trainer, trainer.model, dict(batch)).item(), rel=1e-6)
    lines = [r.getMessage() for r in caplog.records if "TRL's fused LM head" in r.getMessage()]
    assert len(lines) == 1 and "label_smoothing_factor=0.1" in lines[0]
