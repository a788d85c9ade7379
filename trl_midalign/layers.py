"""Finding the decoder block stack of a causal LM, and the truncated forward that stops after block L.

Layer numbers follow the `hidden_states` convention of transformers: layer 0 is the embedding output (the input of
block 0) and layer `L` (1 <= L <= N) is the output of block `L - 1`. Layer `N` is, like `hidden_states[N]`, taken
after the final norm.
"""

from typing import Literal, get_args

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a hook once the requested layer is computed, to skip the blocks above it and the LM head."""


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DeepSpeed engines keep the model in `.module`; PEFT models expose the transformers model as the base model
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def get_decoder(model: nn.Module) -> nn.Module:
    """
    Return the module that owns the decoder block stack of a causal LM (for example `LlamaModel`).

    Calling it with `input_ids` and `attention_mask` runs the embeddings and the blocks but never the LM head.

    Args:
        model (`torch.nn.Module`):
            A causal LM: a [`~transformers.PreTrainedModel`], a [`~peft.PeftModel`], or either of them wrapped by
            DDP or a DeepSpeed engine.

    Returns:
        `torch.nn.Module`: The decoder, whose `layers` attribute is the block stack.
    """
    base = _unwrap(model)
    candidates = []
    if hasattr(base, "get_decoder"):
        try:
            candidates.append(base.get_decoder())
        except (AttributeError, NotImplementedError):
            pass
    candidates.append(base)
    candidates.extend(module for _, module in base.named_modules())
    for module in candidates:
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and len(module.layers) > 0:
            return module
    raise ValueError(
        f"Could not find the decoder block stack of {type(base).__name__}: trl-midalign supports decoder-only models "
        "whose blocks sit in a `layers` ModuleList (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, OLMo, ...). Models "
        "that name their stack differently (for example GPT-2's `h`) are not supported."
    )


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """
    Return the block stack (`nn.ModuleList`) of a causal LM, see [`get_decoder`].

    Args:
        model (`torch.nn.Module`):
            A causal LM, possibly PEFT-, DDP- or DeepSpeed-wrapped.

    Returns:
        `torch.nn.ModuleList`: The decoder blocks, in order.
    """
    return get_decoder(model).layers


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder blocks `N` of a causal LM (the last valid layer index)."""
    return len(get_decoder_layers(model))


LayerKeyword = Literal["middle", "auto"]
"""`"middle"`: block count // 2; `"auto"`: the layer a probe of the base model recommends (see `AlignmentTrainer`)."""
LAYER_KEYWORDS: tuple[str, ...] = get_args(LayerKeyword)


def parse_layer_spec(spec: int | float | str) -> int | float | str:
    """
    Check an `align_layer` setting as far as it can be checked without the model, and return it as a keyword
    (`"middle"`, `"auto"`), an int or a float. Strings holding an int or a float are converted, as they come from the
    command line. This is the one parser of layer settings: [`AlignmentConfig`] and [`resolve_layer`] both use it.

    Args:
        spec (`int`, `float` or `str`):
            A keyword of `LayerKeyword`, an int layer index other than 0 (negative counts from the top), or a float in
            `(0, 1]` giving a fraction of the depth.

    Returns:
        `int`, `float` or `str`: The setting, converted.
    """
    if spec is None:
        raise TypeError(
            "align_layer must be 'middle', 'auto', an int layer index or a float fraction of the depth, got None; "
            "leave it unset for the default 'middle'."
        )
    value = spec
    if isinstance(value, str):
        text = value.strip().lower()
        if text in LAYER_KEYWORDS:
            return text
        for parse in (int, float):
            try:
                value = parse(text)
                break
            except ValueError:
                pass
        else:
            raise ValueError(
                f"align_layer={spec!r} is not understood: use 'middle', 'auto', an int layer index (negative counts "
                "from the top, -1 = last layer), or a float fraction of the depth in (0, 1]."
            )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"align_layer must be 'middle', 'auto', an int or a float, got {spec!r}.")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(
            f"align_layer={value}: a float is a fraction of the model's depth and must lie in (0, 1]; pass an int for "
            "a layer index."
        )
    if value == 0:
        raise ValueError(
            "align_layer=0 is the embedding output, which has nothing below it to align; use a layer >= 1, "
            "'middle' (the paper's choice) or 'auto'."
        )
    return value


def resolve_layer(spec: int | float | str, num_layers: int) -> int:
    """
    Turn an `align_layer` setting into a layer index `1 <= L <= num_layers`.

    Args:
        spec (`int`, `float` or `str`):
            `"middle"` (`num_layers // 2`), a positive int (the layer itself), a negative int counted from the top
            (`-1` is the last layer, `num_layers`), or a float in `(0, 1]` giving a fraction of the depth (rounded).
            Strings holding an int or a float are accepted, as they come from the command line. `"auto"` needs a
            probe of the model: [`AlignmentTrainer`] resolves it.
        num_layers (`int`):
            Number of decoder blocks `N` of the model.

    Returns:
        `int`: The layer index, in the `hidden_states` convention (layer `L` is the output of block `L - 1`).
    """
    value = parse_layer_spec(spec)
    if value == "auto":
        raise ValueError(
            "align_layer='auto' is resolved by probing the model on alignment pairs (AlignmentTrainer does it, or "
            "`trl-midalign probe`); pass 'middle' or a layer to resolve_layer."
        )
    if value == "middle":
        return max(1, num_layers // 2)
    if isinstance(value, float):
        return max(1, round(value * num_layers))
    layer = value + num_layers + 1 if value < 0 else value
    if not 1 <= layer <= num_layers:
        raise ValueError(
            f"align_layer={spec!r} is outside the model: it has {num_layers} decoder blocks, so the layer must be in "
            f"[1, {num_layers}] (or [-{num_layers}, -1] counted from the top). Layer 0 is the embedding output, which "
            "the alignment loss cannot use."
        )
    return layer


def layer_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Hidden states of `layer` (`hidden_states[layer]` in transformers' convention), computed by running only the
    embeddings and blocks `0 .. layer - 1`: the blocks above and the LM head are never executed.

    A forward hook on block `layer - 1` (or the final norm for `layer == N`) captures its output and stops the
    forward by raising a private exception. The states keep their autograd graph, so gradients flow to the blocks
    below `layer` (and their adapters). The caller is responsible for distributed wrappers: under DDP or DeepSpeed
    call this inside one forward of the wrapper (as [`AlignmentTrainer`] does), since it calls the inner decoder.

    Args:
        model (`torch.nn.Module`):
            A causal LM, possibly PEFT-, DDP- or DeepSpeed-wrapped.
        input_ids (`torch.Tensor`):
            Token ids of shape `(batch, seq_len)`.
        attention_mask (`torch.Tensor` or `None`):
            Attention mask of shape `(batch, seq_len)`; `None` for packed rows (then `position_ids`).
        layer (`int`):
            Layer index in `[0, N]`; 0 returns the embedding output.
        position_ids (`torch.Tensor`, *optional*):
            Positions of shape `(batch, seq_len)`, restarting at 0 where a packed sequence starts.

    Returns:
        `torch.Tensor`: States of shape `(batch, seq_len, hidden)`.
    """
    decoder = get_decoder(model)
    blocks = decoder.layers
    num_layers = len(blocks)
    if not 0 <= layer <= num_layers:
        raise ValueError(
            f"layer={layer} is outside the model: it has {num_layers} blocks, valid layers are 0..{num_layers}."
        )
    captured = {}

    if layer == 0:

        def hook(module, args, kwargs):
            captured["states"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    else:
        final_norm = getattr(decoder, "norm", None)
        stop_module = final_norm if layer == num_layers and isinstance(final_norm, nn.Module) else blocks[layer - 1]

        def hook(module, args, output):
            captured["states"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = stop_module.register_forward_hook(hook)
    try:
        # Without a cache (DESIGN.md: with one, transformers builds no per-sequence mask for packed rows)
        decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "states" not in captured:
        raise RuntimeError(
            f"The forward of {type(decoder).__name__} finished without running the module that produces layer "
            f"{layer}; its block stack is not used the way trl-midalign expects."
        )
    return captured["states"]


def packed_layer_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int,
    row_tokens: int,
) -> torch.Tensor:
    """
    [`layer_hidden_states`] of right-padded sentences, computed without their padding: the sentences are packed in
    order into rows of at most `row_tokens` tokens, with positions restarting at 0 for each sentence and no attention
    mask, so that the attention implementation keeps them apart (eager, SDPA, flex and flash attention do, from the
    positions); the states are then put back in the padded layout. Only for models whose attention separates packed
    sequences (`AlignmentConfig.align_padding_free`).

    Args:
        model (`torch.nn.Module`):
            A causal LM, possibly PEFT-, DDP- or DeepSpeed-wrapped.
        input_ids (`torch.Tensor`):
            Token ids of shape `(batch, seq_len)`, right-padded.
        attention_mask (`torch.Tensor`):
            Right-padding mask of shape `(batch, seq_len)`; every row has at least one token.
        layer (`int`):
            Layer index in `[0, N]`.
        row_tokens (`int`):
            Most tokens per packed row (a longer sentence gets a row of its own); bounds the attention's
            `row_tokens x row_tokens` scores.

    Returns:
        `torch.Tensor`: States of shape `(batch, seq_len, hidden)`, zeros at the padding.
    """
    real = attention_mask.bool()
    lengths = real.sum(dim=1).tolist()
    rows, starts, used = [], [], [0]
    for length in lengths:  # first fit in order: a new row when this sentence does not fit
        if used[-1] + length > row_tokens and used[-1] > 0:
            used.append(0)
        rows.append(len(used) - 1)
        starts.append(used[-1])
        used[-1] += length
    device = input_ids.device
    width = max(used)
    within = real.cumsum(dim=1) - 1  # each token's position in its sentence
    row_of = torch.tensor(rows, device=device)[:, None].expand_as(real)[real]
    column_of = (torch.tensor(starts, device=device)[:, None] + within)[real]
    # The free end of a row is a sequence of its own (positions from 0): it attends to nothing real and is dropped
    filled = torch.tensor(used, device=device)[:, None]
    position_ids = (torch.arange(width, device=device)[None, :] - filled).clamp(min=0)
    position_ids = position_ids.index_put((row_of, column_of), within[real])
    packed_ids = input_ids.new_full((len(used), width), int(input_ids[0, 0])).index_put(
        (row_of, column_of), input_ids[real]
    )
    states = layer_hidden_states(model, packed_ids, None, layer, position_ids=position_ids)  # (rows, width, hidden)
    padded = states.new_zeros(*input_ids.shape, states.size(-1))
    return padded.index_put(tuple(real.nonzero().T), states[row_of, column_of])
