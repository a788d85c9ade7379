"""Pooling and the contrastive alignment loss, as plain tensor functions (no model, no Trainer).

[`pool`] is the one pooling registry: the trainer, the layer probe and its callback all pool through it, so a new
pooling mode is a function in `_POOLERS` and a name in `PoolingMode`, here and nowhere else.

The loss is the one of Liu & Niehues, "Middle-Layer Representation Alignment for Cross-Lingual Transfer in
Fine-Tuned LLMs" (https://huggingface.co/papers/2502.14830): an InfoNCE objective on the cosine similarity of
mean-pooled middle-layer states of parallel sentences, with the other pairs of the batch as negatives.
"""

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F


PoolingMode = Literal["mean", "mean_no_special", "last"]
"""How a sentence's token states become one vector; each mode has its function in `_POOLERS`."""
POOLINGS: tuple[str, ...] = get_args(PoolingMode)
Direction = Literal["source_to_target", "both"]
"""Which retrieval directions the contrastive loss averages."""
DIRECTIONS: tuple[str, ...] = get_args(Direction)
StopGradient = Literal["target", None]
"""`"target"` detaches the English side of the pairs; `None` trains both sides."""
STOP_GRADIENTS: tuple[str | None, ...] = get_args(StopGradient)


def masked_mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """
    Average the hidden states of each sequence over the positions where `attention_mask` is non-zero.

    Args:
        hidden_states (`torch.Tensor`):
            States of shape `(batch, seq_len, hidden)`.
        attention_mask (`torch.Tensor`):
            Mask of shape `(batch, seq_len)`, 1 for positions to average and 0 for padding (or any position to leave
            out, such as special tokens).

    Returns:
        `torch.Tensor`: Pooled states of shape `(batch, hidden)`, in the dtype of `hidden_states`.

    Example:

    ```python
    >>> states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    >>> masked_mean_pool(states, torch.tensor([[1, 1, 0]]))
    tensor([[2., 3.]])
    ```
    """
    if hidden_states.dim() != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"Expected hidden_states of shape (batch, seq_len, hidden) and attention_mask of shape (batch, seq_len), "
            f"got {tuple(hidden_states.shape)} and {tuple(attention_mask.shape)}."
        )
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (batch, seq_len, 1)
    counts = mask.sum(dim=1)  # (batch, 1)
    if (counts == 0).any():
        empty = (counts.squeeze(-1) == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Rows {empty} have no position to pool (their mask is all zeros). Every sentence needs at least one "
            "token; drop empty sentences, or use align_pooling='mean' when a sentence consists of special tokens "
            "only."
        )
    return (hidden_states * mask).sum(dim=1) / counts  # (batch, hidden)


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """
    Take the hidden state of the last non-padding position of each right-padded sequence.

    Args:
        hidden_states (`torch.Tensor`):
            States of shape `(batch, seq_len, hidden)`.
        attention_mask (`torch.Tensor`):
            Right-padding mask of shape `(batch, seq_len)`.

    Returns:
        `torch.Tensor`: States of shape `(batch, hidden)`.
    """
    last = attention_mask.long().sum(dim=1) - 1  # (batch,)
    if (last < 0).any():
        raise ValueError("A row of the attention mask is all zeros: there is no last token to pool.")
    return hidden_states[torch.arange(hidden_states.size(0), device=hidden_states.device), last]  # (batch, hidden)


def _mean_without_special_tokens(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor | None
) -> torch.Tensor:
    if special_tokens_mask is None:
        raise ValueError(
            "pooling='mean_no_special' needs the special_tokens_mask of the sentences (True on special tokens); build "
            "it with `trl_midalign.data.special_tokens_mask(input_ids, tokenizer)`."
        )
    return masked_mean_pool(hidden_states, attention_mask.bool() & ~special_tokens_mask.bool())


# The one pooling registry: the trainer, the layer probe and its callback all pool through `pool`. A new mode is a
# function here and a name in `PoolingMode`.
_POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "mean": lambda states, mask, special: masked_mean_pool(states, mask),
    "mean_no_special": _mean_without_special_tokens,
    "last": lambda states, mask, special: last_token_pool(states, mask),
}


def pool(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: PoolingMode = "mean",
    special_tokens_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Pool the token states of each right-padded sentence into one vector, as `align_pooling` says.

    Args:
        hidden_states (`torch.Tensor`):
            States of shape `(batch, seq_len, hidden)`.
        attention_mask (`torch.Tensor`):
            Right-padding mask of shape `(batch, seq_len)`.
        pooling (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over the attention mask (the reference, BOS included), `"mean_no_special"` (mean leaving out
            special tokens such as BOS/EOS) or `"last"` (the last non-padding token's state).
        special_tokens_mask (`torch.Tensor`, *optional*):
            Boolean `(batch, seq_len)` mask, `True` on special tokens (see
            [`~trl_midalign.data.special_tokens_mask`]); needed by `"mean_no_special"` only.

    Returns:
        `torch.Tensor`: Pooled states of shape `(batch, hidden)`.

    Example:

    ```python
    >>> states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    >>> pool(states, torch.tensor([[1, 1, 0]]), "last")
    tensor([[3., 4.]])
    ```
    """
    if pooling not in _POOLERS:
        raise ValueError(f"pooling={pooling!r} is not supported; choose one of {list(POOLINGS)}.")
    return _POOLERS[pooling](hidden_states, attention_mask, special_tokens_mask)


def contrastive_alignment_loss(
    source: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.1,
    directions: Direction = "source_to_target",
    stop_gradient: StopGradient = None,
    same_pair_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Contrastive (InfoNCE) alignment loss of Liu & Niehues (2025), https://huggingface.co/papers/2502.14830.

    Row `i` of `source` (the non-English sentence of pair `i`) is scored against every row of `target` (the English
    sentences of the batch) by cosine similarity divided by `temperature`; the loss is the cross-entropy of picking
    its own translation `target[i]`, averaged over rows. The other targets of the batch are the negatives, so the
    batch needs at least two pairs. A lower temperature sharpens the softmax over candidates: it is the inverse
    scale applied to cosines in `[-1, 1]`. With `directions="both"`, the symmetric loss that also makes each target
    pick its source is averaged in (as in CLIP); with `stop_gradient="target"`, the English side is detached, so only
    the non-English representations move towards the English ones (the paper's unidirectional variant). This is the
    multiple-negatives ranking loss of sentence-transformers, applied to pooled middle-layer LLM states.

    Args:
        source (`torch.Tensor`):
            Pooled states of the non-English sentences, shape `(batch, hidden)`.
        target (`torch.Tensor`):
            Pooled states of their English translations, shape `(batch, hidden)`, row `i` translating `source[i]`.
        temperature (`float`, *optional*, defaults to `0.1`):
            Temperature dividing the cosine similarities.
        directions (`str`, *optional*, defaults to `"source_to_target"`):
            `"source_to_target"` (the reference implementation) or `"both"` (average with target-to-source).
        stop_gradient (`str` or `None`, *optional*, defaults to `None`):
            `"target"` to detach the English side, or `None`.
        same_pair_mask (`torch.Tensor`, *optional*):
            Boolean `(batch, batch)` mask, `True` at `[i, j]` when pair `j` repeats a sentence of pair `i` (a
            duplicate). Such candidates are not counted as negatives of each other. The diagonal is ignored.

    Returns:
        `torch.Tensor`: The scalar loss (float32).

    Example:

    ```python
    >>> source = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> contrastive_alignment_loss(source, source.clone(), temperature=0.1)
    tensor(4.5399e-05)
    ```
    """
    if source.dim() != 2 or source.shape != target.shape:
        raise ValueError(
            f"source and target must both have shape (batch, hidden), got {tuple(source.shape)} and "
            f"{tuple(target.shape)}."
        )
    if source.size(0) < 2:
        raise ValueError(
            f"The contrastive alignment loss needs at least 2 pairs in a batch (the other pairs are the negatives), "
            f"got {source.size(0)}. Increase the per-device batch size, or set dataloader_drop_last=True so that no "
            "batch is left with a single pair."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}.")
    if stop_gradient not in STOP_GRADIENTS:
        raise ValueError(f"stop_gradient must be one of {STOP_GRADIENTS}, got {stop_gradient!r}.")

    if stop_gradient == "target":
        target = target.detach()
    # Cosines in float32: bf16 cosines divided by a small temperature lose most of their resolution
    source = F.normalize(source.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    scores = source @ target.T / temperature  # (batch, batch)
    if same_pair_mask is not None:
        off_diagonal = ~torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
        scores = scores.masked_fill(same_pair_mask.to(scores.device) & off_diagonal, float("-inf"))
    labels = torch.arange(scores.size(0), device=scores.device)  # (batch,)
    loss = F.cross_entropy(scores, labels)
    if directions == "both":
        loss = (loss + F.cross_entropy(scores.T, labels)) / 2
    return loss
