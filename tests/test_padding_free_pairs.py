"""Padding-free alignment pairs (`align_padding_free`): the sentences of the pairs packed into rows, with positions
restarting per sentence and no attention mask, give the same states, pooled vectors, loss and gradients as the padded
pairs (float32; tolerance 1e-5 absolute on states and pooled vectors, 1e-6 relative on losses, and on each gradient
tensor 1e-5 of its largest entry: the random tiny Gemma 3 has embedding gradients up to ~1500, whose float32 rounding
is ~1e-3 whichever layout, also between separate forwards of each sentence), also with gradient caching and gathered
negatives; the default follows the attention
implementation, and `True` is refused where packed sentences would attend to each other.
"""

import pytest
import torch
from datasets import Dataset
from testing_utils import alignment_config, build_model, task_rows
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from trl_midalign import AlignmentTrainer, layer_hidden_states, packed_layer_hidden_states, pool
from trl_midalign.layers import get_decoder


def assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and len(expected) > 0
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (actual[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-7, name


def padded_sentences(vocab_size: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, vocab_size, (len(lengths), width), generator=generator) * mask
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])  # Gemma 3: sliding window 8, sentences up to 13
@pytest.mark.parametrize("row_tokens", [8, 20, 1000])  # most sentences alone, a few per row, all in one row
def test_packed_states_and_gradients_equal_the_padded_ones(tokenizer, kind, row_tokens):
    lengths = [5, 13, 3, 9, 1, 7, 12, 2]
    ids, mask = padded_sentences(len(tokenizer), lengths)
    results = {}
    for name in ("padded", "packed"):
        model = build_model(kind, len(tokenizer))
        if name == "padded":
            states = layer_hidden_states(model, ids, mask, 3)
        else:
            states = packed_layer_hidden_states(model, ids, mask, 3, row_tokens)
        pooled = pool(states, mask, "mean")
        (pooled.square().sum() + pool(states, mask, "last").sum()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (states * mask[..., None], pooled, grads)
    (padded_states, padded_pooled, padded_grads), (packed_states, packed_pooled, packed_grads) = results.values()
    torch.testing.assert_close(packed_states, padded_states, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_pooled, padded_pooled, rtol=0, atol=1e-5)
    assert_grads_close(packed_grads, padded_grads)
    # Control: the same packed rows with positions running on across sentences are not separate sequences
    model = build_model(kind, len(tokenizer))
    real = mask.bool()
    joined = layer_hidden_states(model, ids[real][None], None, 3, position_ids=torch.arange(int(real.sum()))[None])
    assert (joined[0] - padded_states[real]).abs().max() > 1e-3


def packed_rows_seen(trainer) -> list[tuple]:
    """Record (rows, attention mask given) of every decoder call of `trainer`'s model."""
    calls = []
    decoder = get_decoder(trainer.model)

    def hook(module, args, kwargs):
        calls.append((kwargs["input_ids"].size(0), kwargs.get("attention_mask") is not None))

    decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(align_mini_batch_size=2), dict(align_gather_negatives=True)],
    ids=["plain", "cached", "gather"],
)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_alignment_loss_and_gradients_equal_the_padded_pairs(tmp_path, tokenizer, kind, variant):
    results = {}
    for setting in (False, True):
        args = alignment_config(
            tmp_path / str(setting), per_device_train_batch_size=8, align_schedule="alignment_only",
            align_layer=3, align_padding_free=setting, align_max_length=16, **variant,
        )  # fmt: skip
        model = build_model(kind, len(tokenizer))
        trainer = AlignmentTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(task_rows(n=8)), processing_class=tokenizer
        )
        assert trainer._align_padding_free is setting
        calls = packed_rows_seen(trainer)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[setting] = (loss.item(), grads, calls, batch)
    (padded_loss, padded_grads, padded_calls, batch), (packed_loss, packed_grads, packed_calls, _) = results.values()
    sentences = batch["align_input_ids"].size(0)  # 16: the sources, then the targets
    assert all(rows == (sentences if "align_mini_batch_size" not in variant else 4) and masked
               for rows, masked in padded_calls)  # fmt: skip
    assert packed_calls and all(rows < sentences and not masked for rows, masked in packed_calls)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6) and padded_loss > 0
    assert_grads_close(packed_grads, padded_grads)


def custom_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA under another name: transformers cannot know that it keeps packed sequences apart."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("my_attention", custom_attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "my_attention"])
def test_the_default_follows_the_attention_implementation(tmp_path, tokenizer, attention):
    def trainer_with(setting):
        model = build_model("llama", len(tokenizer))
        model.set_attn_implementation(attention)
        args = alignment_config(tmp_path, align_padding_free=setting)
        return AlignmentTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(task_rows(n=8)), processing_class=tokenizer
        )

    separates = attention != "my_attention"
    assert trainer_with(None)._align_padding_free is separates
    assert trainer_with(False)._align_padding_free is False
    if separates:
        assert trainer_with(True)._align_padding_free is True
    else:
        with pytest.raises(ValueError, match="align_padding_free=True .* attn_implementation='my_attention'"):
            trainer_with(True)
