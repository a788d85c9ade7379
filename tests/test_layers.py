import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import MODEL_CLASSES, block_of, build_model, plain_info_nce, plain_pool
from transformers import GPT2Config, GPT2LMHeadModel

from trl_midalign import (
    contrastive_alignment_loss,
    get_decoder_layers,
    layer_hidden_states,
    masked_mean_pool,
    resolve_layer,
)
from trl_midalign.layers import parse_layer_spec


def batch(seed=0, vocab=400):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return ids, mask


def lora(model, seed=0):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize("kind", sorted(MODEL_CLASSES))
@pytest.mark.parametrize("peft", [False, True])
def test_states_equal_full_forward_at_every_layer(kind, peft):
    model = build_model(kind)
    model = lora(model) if peft else model
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in range(len(reference)):
            states = layer_hidden_states(model, ids, mask, layer)
            assert torch.equal(states, reference[layer]), f"layer {layer}"


@pytest.mark.parametrize("kind", sorted(MODEL_CLASSES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_full_forward(kind, checkpointing):
    """The truncated forward's gradients equal those of the same loss taken from a full forward."""
    layer = 2
    grads = []
    for truncated in (True, False):
        model = lora(build_model(kind), seed=1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids, mask = batch(seed=2)
        if truncated:
            states = layer_hidden_states(model, ids, mask, layer)
        else:
            states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        pooled = masked_mean_pool(states, mask)
        contrastive_alignment_loss(pooled[:2], pooled[2:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_blocks_from_layer_and_lm_head_do_not_run():
    model = build_model("llama", num_layers=6)
    calls = []
    for index, block in enumerate(get_decoder_layers(model)):
        block.register_forward_hook(lambda *args, index=index: calls.append(index))
    model.lm_head.register_forward_hook(lambda *args: calls.append("lm_head"))
    model.model.norm.register_forward_hook(lambda *args: calls.append("norm"))
    ids, mask = batch()
    layer_hidden_states(model, ids, mask, 3)
    assert calls == [0, 1, 2]
    calls.clear()
    model(input_ids=ids, attention_mask=mask)  # the hooks themselves work and were removed cleanly
    assert calls == [0, 1, 2, 3, 4, 5, "norm", "lm_head"]


def test_alignment_gradients_reach_only_blocks_below_the_layer():
    model = lora(build_model("llama", num_layers=6))
    ids, mask = batch()
    pooled = masked_mean_pool(layer_hidden_states(model, ids, mask, 3), mask)
    contrastive_alignment_loss(pooled[:2], pooled[2:]).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "no gradient at all"
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert (name in with_grad) == (block_of(name) < 3), name


def test_reference_loss_composition_matches_plain_computation():
    """The public functions compose to the reference loss: mean-pooled hidden_states[L], cosine / T, diagonal CE."""
    model = build_model("llama", num_layers=8).eval()
    ids0, mask0 = batch(seed=5)
    ids1, mask1 = batch(seed=6)
    with torch.no_grad():
        loss = contrastive_alignment_loss(
            masked_mean_pool(layer_hidden_states(model, ids0, mask0, 4), mask0),
            masked_mean_pool(layer_hidden_states(model, ids1, mask1, 4), mask1),
            temperature=0.1,
        )
        states0 = model(input_ids=ids0, attention_mask=mask0, output_hidden_states=True).hidden_states[4]
        states1 = model(input_ids=ids1, attention_mask=mask1, output_hidden_states=True).hidden_states[4]
    expected = plain_info_nce(plain_pool(states0.double(), mask0), plain_pool(states1.double(), mask1), 0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_resolve_layer_conventions():
    assert resolve_layer("middle", 32) == 16
    assert resolve_layer("middle", 18) == 9
    assert resolve_layer(16, 32) == 16
    assert resolve_layer("-1", 32) == 32
    assert resolve_layer(-8, 32) == 25
    assert resolve_layer(0.5, 32) == 16
    assert resolve_layer("0.25", 30) == 8  # round(7.5) -> 8 (banker's rounding on .5)
    with pytest.raises(ValueError, match="has 32 decoder blocks"):
        resolve_layer(33, 32)
    with pytest.raises(ValueError, match="has 32 decoder blocks"):
        resolve_layer(-33, 32)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        resolve_layer(1.5, 32)
    with pytest.raises(ValueError, match="not understood"):
        resolve_layer("top", 32)


def test_model_without_layer_stack_is_refused():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="Could not find the decoder block stack of GPT2LMHeadModel"):
        layer_hidden_states(model, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), 1)


def test_layer_outside_model_is_refused():
    model = build_model("llama", num_layers=4)
    with pytest.raises(ValueError, match="has 4 blocks"):
        layer_hidden_states(model, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), 5)


def test_parse_layer_spec_is_the_model_free_half_of_resolve_layer():
    assert parse_layer_spec(" Auto ") == "auto" and parse_layer_spec("middle") == "middle"
    assert parse_layer_spec("-2") == -2 and parse_layer_spec("0.5") == 0.5 and parse_layer_spec(3) == 3
    for bad, error, message in [
        (None, TypeError, "got None"),
        (0, ValueError, "embedding output"),
        ("0", ValueError, "embedding output"),
        (2.5, ValueError, r"\(0, 1\]"),
        (True, ValueError, "got True"),
        ("top", ValueError, "'top' is not understood"),
    ]:
        with pytest.raises(error, match=message):
            parse_layer_spec(bad)
        with pytest.raises(error, match=message):
            resolve_layer(bad, 8)
    with pytest.raises(ValueError, match="'auto' is resolved by probing"):
        resolve_layer("auto", 8)
