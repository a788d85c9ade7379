"""Pooling and the contrastive alignment loss, as plain tensor functions (no model, no Trainer).

[`pool`] is the one pooling registry: the trainer, the layer probe and its callback all pool through it, so a new
pooling mode is a function in `_POOLERS` and a name in `PoolingMode`, here and nowhere else.

The loss is the one of Liu & Niehues, "Middle-Layer Representation Alignment for Cross-Lingual Transfer in
Fine-Tuned LLMs" (https://huggingface.co/papers/2502.14830): an InfoNCE objective on the cosine similarity of
mean-pooled middle-layer states of parallel sentences, with the other pairs of the batch as negatives.

Two ways to give each pair more negatives than one device's micro-batch holds (as sentence-transformers does for
sentence embeddings) are here too: gathering the pooled states of every process (`gather_across_devices`) and
gradient caching ([`gradient_cached_loss`]), which embeds a large batch in mini-batches.
"""

import contextlib
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.distributed as dist
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
    pair_ids: torch.Tensor | None = None,
    gather_across_devices: bool = False,
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
            duplicate). Such candidates are not counted as negatives of each other. The diagonal is ignored. With
            `gather_across_devices`, its columns must cover the gathered candidates, `(batch, total)`; pass `pair_ids`
            instead to have the mask built across processes.
        pair_ids (`torch.Tensor`, *optional*):
            Integer identities of shape `(batch, 2)`: a stable hash of each pair's source and of its target sentence
            (the collator's `"align_pair_ids"`). Candidate `j` is not a negative of row `i` when they share their
            source or their target identity. Gathered together with the states, so duplicates are masked across
            processes too. Use either this or `same_pair_mask`.
        gather_across_devices (`bool`, *optional*, defaults to `False`):
            Gather the pooled states of every process of the default `torch.distributed` group, so that each row
            competes with the rows of all processes (`world_size x batch` candidates). The gather is differentiable:
            the gradient reaching a process's own rows is the sum of the gradients of every process's loss, so under
            data parallelism, which averages the gradients over processes, a step equals the single-process step on
            the concatenated batch (see the note below). A no-op without an initialised process group or with one
            process.

    Returns:
        `torch.Tensor`: The scalar loss (float32). With `gather_across_devices`, the mean over this process's own rows
        (scored against all gathered candidates); the mean of it over processes is the loss of the concatenated batch.

    Note on scaling with `gather_across_devices`: with `W` processes of `B` rows each, the loss of the concatenated
    batch is `L = (1 / W) * sum_r loss_r`. Process `r` back-propagates its own `loss_r`, and the gather's backward adds
    the gradients that the other processes' losses send to its rows, so process `r` computes `d(sum_r' loss_r') /
    d(its parameters' share)`. Summed over processes that is `W * dL/dtheta`; DDP, DeepSpeed and FSDP average over
    processes, which gives exactly `dL/dtheta`, the gradient of one process holding the whole batch. With unequal
    batch sizes across processes (a short last batch) the average weights each process's rows by `1 / (W * B_r)`
    instead of `1 / sum_r B_r`, as data parallelism does for any per-process mean.

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
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}.")
    if stop_gradient not in STOP_GRADIENTS:
        raise ValueError(f"stop_gradient must be one of {STOP_GRADIENTS}, got {stop_gradient!r}.")
    if same_pair_mask is not None and pair_ids is not None:
        raise ValueError("Pass either same_pair_mask or pair_ids to mark duplicate pairs, not both.")
    if pair_ids is not None and tuple(pair_ids.shape) != (source.size(0), 2):
        raise ValueError(
            f"pair_ids must have shape (batch, 2) = ({source.size(0)}, 2): one identity for the source and one for "
            f"the target sentence of each pair; got {tuple(pair_ids.shape)}."
        )

    if stop_gradient == "target":
        target = target.detach()
    # Cosines in float32: bf16 cosines divided by a small temperature lose most of their resolution
    source = source.float()
    target = target.float()
    world_size, rank = _world() if gather_across_devices else (1, 0)
    if world_size > 1:
        sizes = _gather_sizes(source.size(0), source.device)
        all_source = _gather_rows(source, sizes)  # (total, hidden)
        all_target = _gather_rows(target, sizes)  # (total, hidden)
        all_ids = _gather_rows(pair_ids, sizes) if pair_ids is not None else None  # (total, 2)
        offset = sum(sizes[:rank])
    else:
        all_source, all_target, all_ids, offset = source, target, pair_ids, 0
    batch, total = source.size(0), all_source.size(0)
    if total < 2:
        raise ValueError(
            f"The contrastive alignment loss needs at least 2 pairs in a batch (the other pairs are the negatives), "
            f"got {total}. Increase the per-device batch size, or set dataloader_drop_last=True so that no "
            "batch is left with a single pair."
        )

    labels = torch.arange(batch, device=source.device) + offset  # (batch,): own column among the candidates
    duplicates = None
    if pair_ids is not None:
        duplicates = (pair_ids[:, None, 0] == all_ids[None, :, 0]) | (pair_ids[:, None, 1] == all_ids[None, :, 1])
    elif same_pair_mask is not None:
        if tuple(same_pair_mask.shape) != (batch, total):
            raise ValueError(
                f"same_pair_mask must have shape (batch, candidates) = ({batch}, {total}), got "
                f"{tuple(same_pair_mask.shape)}. Across processes pass pair_ids instead."
            )
        duplicates = same_pair_mask.to(device=source.device, dtype=torch.bool)
    if duplicates is not None:
        own = torch.zeros_like(duplicates)
        own[torch.arange(batch, device=own.device), labels] = True
        duplicates = duplicates & ~own  # (batch, total): never mask a row's own translation

    def cross_entropy(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        scores = F.normalize(queries, dim=-1) @ F.normalize(candidates, dim=-1).T / temperature  # (batch, total)
        if duplicates is not None:
            scores = scores.masked_fill(duplicates, float("-inf"))
        return F.cross_entropy(scores, labels)

    loss = cross_entropy(source, all_target)
    if directions == "both":
        loss = (loss + cross_entropy(target, all_source)) / 2
    return loss


def _world() -> tuple[int, int]:
    """World size and rank of the default process group, `(1, 0)` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather_sizes(rows: int, device: torch.device) -> list[int]:
    """Number of rows of every process (batches may differ, e.g. a short last batch)."""
    world_size, _ = _world()
    local = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(sizes, local)
    return [int(size.item()) for size in sizes]


class _AllGatherRows(torch.autograd.Function):
    """
    Concatenate the rows of every process. Backward: every process's loss depends on this process's rows (as
    negatives, or as its own rows), so the gradients of all processes are summed and each process keeps the slice of
    its own rows.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        _, rank = _world()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))  # all_gather needs equal shapes
        padded[: tensor.size(0)] = tensor
        buffers = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(buffers, padded)
        buffers[rank] = tensor  # the own rows as they are (same values)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([buffer[:size] for buffer, size in zip(buffers, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def _gather_rows(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather the rows of every process, differentiably when `tensor` needs a gradient."""
    if tensor.requires_grad:
        return _AllGatherRows.apply(tensor, sizes)
    with torch.no_grad():
        return _AllGatherRows.apply(tensor, sizes)


class _RngState:
    """The CPU generator state and, for an accelerator tensor, that device's generator state."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accelerator = None
        if device.type != "cpu":
            self.accelerator = torch.get_device_module(device.type).get_rng_state(device)

    @contextlib.contextmanager
    def restored(self):
        """Run the block with the saved states, then put back the states from before the block."""
        devices = [] if self.accelerator is None else [self.device]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            if self.accelerator is not None:
                torch.get_device_module(self.device.type).set_rng_state(self.accelerator, self.device)
            yield


def gradient_cached_loss(
    embed: Callable[[int], torch.Tensor],
    num_chunks: int,
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    chunk_context: Callable[[int], contextlib.AbstractContextManager] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """
    A loss over a batch embedded in mini-batches, with the memory of one mini-batch: gradient caching (Gao et al.,
    "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", https://huggingface.co/papers/2101.06983),
    the idea behind sentence-transformers' cached losses.

    1. Each mini-batch `k` is embedded by `embed(k)` without an autograd graph (`torch.no_grad`), after saving the
       random number generator state (dropout masks).
    2. `loss_fn` runs on the concatenated embeddings (leaves that require a gradient), and the gradient of the loss
       with respect to every embedding is computed and cached. Only embeddings, never activations, are kept.
    3. The returned loss is a detached copy with a backward hook. When the caller back-propagates it (`loss.backward()`,
       also scaled or summed with other terms), the hook re-runs `embed(k)` for each mini-batch with its graph and the
       RNG state of step 1, and back-propagates the cached gradient times the incoming gradient. The parameter
       gradients are those of the uncached loss, up to floating-point summation order.

    The cost is a second forward of every mini-batch. `embed` must be deterministic given the RNG state (the same
    inputs in both passes).

    Args:
        embed (`Callable[[int], torch.Tensor]`):
            `embed(k)` returns the embeddings of mini-batch `k`, shape `(rows_k, hidden)`, with a graph to the
            parameters when gradients are enabled.
        num_chunks (`int`):
            Number of mini-batches.
        loss_fn (`Callable[[list[torch.Tensor]], torch.Tensor]`):
            Maps the list of the mini-batches' embeddings to the scalar loss. It may use collectives (it runs once per
            step on every process, and so does its backward).
        chunk_context (`Callable[[int], contextlib.AbstractContextManager]`, *optional*):
            `chunk_context(k)` is entered around the second forward and the backward of mini-batch `k` (for example
            DDP's `no_sync()` for all mini-batches but the last).
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`):
            Device the mini-batches run on: its random number generator (with the CPU's) is saved before each
            mini-batch of step 1 and restored for its second forward.

    Returns:
        `torch.Tensor`: The scalar loss, detached from the mini-batch forwards, with the hook that back-propagates
        through them.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}.")
    device = torch.device(device)
    rng_states, embeddings = [], []
    with torch.no_grad():
        for k in range(num_chunks):
            rng_states.append(_RngState(device))
            embeddings.append(embed(k))
    leaves = [embedded.detach().requires_grad_() for embedded in embeddings]
    with torch.enable_grad():
        loss = loss_fn(leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]
    del leaves, embeddings

    def backward_hook(grad_output: torch.Tensor) -> None:
        for k in range(num_chunks):
            context = chunk_context(k) if chunk_context is not None else contextlib.nullcontext()
            with context, rng_states[k].restored(), torch.enable_grad():
                embedded = embed(k)
                torch.autograd.backward(embedded, grads[k].to(embedded.dtype) * grad_output.to(embedded.dtype))

    result = loss.detach().requires_grad_()
    result.register_hook(backward_hook)
    return result
