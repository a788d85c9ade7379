"""The task loss with the LM head applied only where there are labels.

`SFTTrainer` computes its loss with TRL's fused LM head. With Triton (CUDA, XPU) that head projects only the positions
whose next-token label is not `-100`; elsewhere (the CPU) it projects every position in tiles, so with
`completion_only_loss` the logits of every prompt token are computed and thrown away. On a vocabulary of 262,144 tokens
(Gemma 3) that head is most of a task step.

Here the model's own forward does the projection, with transformers' `logits_to_keep` set to a boolean
`(batch, sequence)` mask of the positions that predict a label: the model applies its LM head (and its own logit
soft-capping or scaling) to those positions only and returns logits of shape `(label tokens, vocabulary)`. The loss is
TRL's: the summed negative log-likelihood of the labels, divided by `num_items_in_batch` (the window's label tokens
under gradient accumulation) or by this micro-batch's label tokens, times the number of processes when
`average_tokens_across_devices` is set. The logged metrics keep TRL's meaning: `entropy` and `mean_token_accuracy` are
the mean over the label tokens of the next-token distribution's entropy and of whether the label is its most likely
token, and `num_tokens` counts every token trained on so far (prompt and padding-free rows included, padding not).

It is one forward of the outermost module (the DDP wrapper, the DeepSpeed engine, the FSDP2-sharded model), as in
`SFTTrainer`, so every engine and PEFT see the call they expect. Where it cannot be exact, TRL's path is kept
([`labels_only_head_unsupported`]).

[`AlignmentTrainer`] uses it for its task steps; [`LabelsOnlySFTTrainer`] is `SFTTrainer` with it and nothing else
(a baseline without alignment that computes the same loss at the same speed).
"""

import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn
from trl import SFTTrainer

from ._logging import get_logger
from .layers import _unwrap


logger = get_logger(__name__)


def labels_only_head_unsupported(trainer, model: nn.Module) -> str | None:
    """
    Why the task loss of `trainer` cannot project only the label positions (then TRL's fused LM head computes it), or
    `None` when it can.

    Args:
        trainer ([`AlignmentTrainer`] or [`LabelsOnlySFTTrainer`]):
            The trainer, after `SFTTrainer.__init__`.
        model (`torch.nn.Module`):
            Its model (a transformers model, possibly wrapped by PEFT).

    Returns:
        `str` or `None`: The reason, a phrase naming the setting, or `None`.
    """
    args = trainer.args
    if not getattr(args, "lm_head_on_labels_only", True):  # an SFTConfig has no such field: on
        return "lm_head_on_labels_only=False"
    if trainer.compute_loss_func is not None:
        return "a compute_loss_func is set (it receives the logits of every position)"
    if trainer.label_smoother is not None:
        return f"label_smoothing_factor={args.label_smoothing_factor} (TRL smooths over the logits of every position)"
    if args.loss_type != "nll":
        return f"loss_type={args.loss_type!r} (only 'nll' is computed here)"
    if args.use_liger_kernel:
        return "use_liger_kernel=True (Liger's kernels compute the loss)"
    if getattr(trainer, "aux_loss_enabled", False):
        return "the router's auxiliary loss is enabled (a mixture-of-experts model)"
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and getattr(parallelism, "sp_enabled", False):
        return "sequence parallelism is enabled (the model reduces its own loss across ranks)"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "a prompt-learning PEFT adapter (its virtual tokens shift the label positions)"
    base = _unwrap(model)
    if _forward_runs_another_module(base):
        return (
            f"{type(base).__name__}.forward runs another model's forward (a copy.deepcopy of a model that TRL already "
            "set up keeps the original's forward in TRL's fused head; load a fresh copy to avoid this)"
        )
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    from trl.kernels.chunked_logprob import _use_triton

    if _use_triton(args.device):
        return f"on {args.device.type} TRL's fused LM head already projects only the label positions, in tiles"
    return None


def _forward_runs_another_module(model: nn.Module) -> bool:
    # TRL's fused head replaces `model.forward` by a method that closes over the forward it replaced, bound to the
    # model; in a deepcopy that closure still holds the original model's method. Follow the chain of closures.
    stack, seen = [model.__dict__.get("forward")], set()
    while stack:
        function = stack.pop()
        if function is None or id(function) in seen:
            continue
        seen.add(id(function))
        if isinstance(function, types.MethodType):
            if isinstance(function.__self__, nn.Module) and function.__self__ is not model:
                return True
            function = function.__func__
        for cell in getattr(function, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, types.MethodType | types.FunctionType):
                stack.append(value)
    return False


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """
    The boolean `(batch, sequence)` mask of the positions whose next token is a label (not `-100`): the positions a
    causal LM's loss reads the logits of.

    Args:
        labels (`torch.Tensor` of shape `(batch, sequence)`):
            The labels, `-100` where nothing is learned (prompt, padding, the first token of each padding-free
            sequence).

    Returns:
        `torch.Tensor`: The mask, of the labels' shape; its last column is always `False`.
    """
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != -100
    return positions


def labels_only_task_loss(
    trainer, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor | None:
    """
    The task loss of one micro-batch, exactly `SFTTrainer.compute_loss`'s for `loss_type="nll"`, with the LM head only
    on the label positions; logs TRL's `entropy`, `mean_token_accuracy` and `num_tokens` into `trainer._metrics`.

    Args:
        trainer ([`AlignmentTrainer`] or [`LabelsOnlySFTTrainer`]):
            The trainer (its accelerator, arguments and metric lists).
        model (`torch.nn.Module`):
            The model to call: the outermost wrapper, or the unwrapped model inside a forward of it.
        inputs (`dict[str, torch.Tensor]`):
            The task micro-batch, with `labels`.
        num_items_in_batch (`torch.Tensor`, `int` or `None`):
            The label tokens of the accumulation window (over all processes with `average_tokens_across_devices`), or
            `None` to normalise by this micro-batch's label tokens.

    Returns:
        `torch.Tensor` or `None`: The loss, or `None` when the model's logits did not come back as one row per label
        position (its forward handles `logits_to_keep` otherwise; the caller then uses TRL's path). The metrics are
        logged only when the loss is returned.
    """
    mode = "train" if trainer.model.training else "eval"
    labels = inputs["labels"]
    positions = label_positions(labels)
    targets = labels[:, 1:][positions[:, :-1]]
    forward_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    forward_inputs["use_cache"] = False
    logits = model(**forward_inputs, logits_to_keep=positions).logits
    if logits.dim() != 2 or logits.size(0) != targets.numel():
        return None
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    num_tokens = targets.numel() if num_items_in_batch is None else num_items_in_batch
    loss = loss / torch.as_tensor(num_tokens, device=loss.device).clamp(min=1)
    accelerator = trainer.accelerator
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (accelerator.num_processes // trainer.get_tp_size())

    with torch.no_grad():
        log_probs = logits.log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        correct = (logits.argmax(-1) == targets).sum()
        count = torch.tensor(targets.numel(), device=logits.device)
    num_valid = accelerator.gather_for_metrics(count).sum()
    entropy_sum = accelerator.gather_for_metrics(entropy.sum()).sum()
    num_correct = accelerator.gather_for_metrics(correct).sum()
    metrics = trainer._metrics[mode]
    metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
    metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
    if mode == "train":
        # Like TRL: the real tokens of the micro-batch (padding-free rows have no attention mask, only positions)
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=labels.device)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in the task batch (as SFTTrainer does).")
        trainer._total_train_tokens += accelerator.gather_for_metrics(local).sum().item() // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]
    return loss


def compute_task_loss(trainer, model: nn.Module, inputs: dict, return_outputs: bool, num_items_in_batch):
    """
    The task loss of one micro-batch and (with `return_outputs`) the model outputs: with the LM head on the label
    positions only where that is exact (`trainer._labels_only_head_reason is None`), else `SFTTrainer.compute_loss`'s.
    A model whose forward returns other logits than asked switches `trainer` to TRL's path for good, with one info
    line.

    Returns:
        `tuple[torch.Tensor, Any]`: The loss and the outputs (`None` unless TRL's path computed them).
    """
    if trainer._labels_only_head_reason is None and not return_outputs and "shift_labels" not in inputs:
        loss = labels_only_task_loss(trainer, model, inputs, num_items_in_batch)
        if loss is not None:
            return loss, None
        trainer._labels_only_head_reason = "the model's forward returned logits for other positions than asked"
        logger.info(f"The task loss uses TRL's fused LM head from here on: {trainer._labels_only_head_reason}.")
    result = SFTTrainer.compute_loss(trainer, model, inputs, return_outputs, num_items_in_batch)
    return result if return_outputs else (result, None)


class LabelsOnlySFTTrainer(SFTTrainer):
    """
    `trl.SFTTrainer` whose training loss applies the LM head only to the positions that predict a label: the same
    loss, gradients and logged metrics (`entropy`, `mean_token_accuracy`, `num_tokens`), without the logits of
    prompt positions that TRL's fused head computes and discards on devices without Triton (the CPU). It is the
    task step of [`AlignmentTrainer`] without any alignment, e.g. the baseline of a transfer comparison, and takes
    exactly `SFTTrainer`'s arguments. Where the labels-only head cannot be exact (see
    [`labels_only_head_unsupported`]: a `compute_loss_func`, label smoothing, Liger kernels, ...) or with an
    [`AlignmentConfig`]'s `lm_head_on_labels_only=False`, it is `SFTTrainer`, with one info line saying why.
    Evaluation (`return_outputs=True`) keeps TRL's path.

    Example:

    ```python
    from datasets import load_dataset
    from trl import SFTConfig
    from trl_midalign import LabelsOnlySFTTrainer

    dataset = load_dataset("trl-lib/Capybara", split="train")
    trainer = LabelsOnlySFTTrainer(model="Qwen/Qwen2.5-0.5B", args=SFTConfig(output_dir="sft"), train_dataset=dataset)
    trainer.train()
    ```
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._labels_only_head_reason = labels_only_head_unsupported(self, self.model)
        if self._labels_only_head_reason is not None and getattr(self.args, "lm_head_on_labels_only", True):
            logger.info(f"The task loss uses TRL's fused LM head: {self._labels_only_head_reason}.")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = compute_task_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss
