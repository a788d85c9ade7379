import pytest
import torch
from testing_utils import build_tokenizer, plain_info_nce, plain_pool

from trl_midalign import contrastive_alignment_loss, masked_mean_pool, pool
from trl_midalign.data import special_tokens_mask
from trl_midalign.losses import POOLINGS, last_token_pool


def test_masked_mean_pool_matches_plain_average():
    torch.manual_seed(0)
    states = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    torch.testing.assert_close(masked_mean_pool(states, mask), plain_pool(states, mask))


def test_masked_mean_pool_rejects_empty_rows_and_bad_shapes():
    with pytest.raises(ValueError, match="no position to pool"):
        masked_mean_pool(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        masked_mean_pool(torch.randn(2, 3), torch.ones(2, 3))


def test_last_token_pool_takes_last_unpadded_position():
    states = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(last_token_pool(states, mask), torch.stack([states[0, 1], states[1, 3]]))


@pytest.mark.parametrize("temperature", [0.1, 0.05, 1.0])
def test_loss_matches_plain_info_nce(temperature):
    torch.manual_seed(1)
    source, target = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    loss = contrastive_alignment_loss(source, target, temperature=temperature)
    assert loss.item() == pytest.approx(plain_info_nce(source, target, temperature), rel=1e-5)


def test_both_directions_average_the_transposed_loss():
    torch.manual_seed(2)
    source, target = torch.randn(5, 8), torch.randn(5, 8)
    both = contrastive_alignment_loss(source, target, directions="both")
    expected = (plain_info_nce(source, target, 0.1) + plain_info_nce(target, source, 0.1)) / 2
    assert both.item() == pytest.approx(expected, rel=1e-4)


def test_stop_gradient_leaves_target_without_gradient():
    torch.manual_seed(3)
    source = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    contrastive_alignment_loss(source, target, stop_gradient="target").backward()
    assert target.grad is None
    assert source.grad is not None and source.grad.abs().sum() > 0
    source.grad = None
    contrastive_alignment_loss(source, target).backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_duplicates_are_not_negatives():
    torch.manual_seed(4)
    source, target = torch.randn(4, 8), torch.randn(4, 8)
    target[2] = target[0]  # pairs 0 and 2 share their English side
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 2] = same[2, 0] = True
    loss = contrastive_alignment_loss(source, target, same_pair_mask=same)
    assert loss.item() == pytest.approx(plain_info_nce(source, target, 0.1, skip={0: [2], 2: [0]}), rel=1e-5)
    assert loss.item() != pytest.approx(contrastive_alignment_loss(source, target).item(), rel=1e-3)


def test_loss_refuses_single_pair_and_bad_settings():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        contrastive_alignment_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="directions"):
        contrastive_alignment_loss(torch.randn(2, 4), torch.randn(2, 4), directions="sideways")
    with pytest.raises(ValueError, match="stop_gradient"):
        contrastive_alignment_loss(torch.randn(2, 4), torch.randn(2, 4), stop_gradient="source")
    with pytest.raises(ValueError, match="temperature"):
        contrastive_alignment_loss(torch.randn(2, 4), torch.randn(2, 4), temperature=0)


def test_bf16_inputs_give_float32_loss_close_to_fp32():
    torch.manual_seed(5)
    source, target = torch.randn(8, 16), torch.randn(8, 16)
    fp32 = contrastive_alignment_loss(source, target)
    bf16 = contrastive_alignment_loss(source.bfloat16(), target.bfloat16())
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_pool_registry_dispatches_every_mode():
    torch.manual_seed(2)
    tokenizer = build_tokenizer()
    input_ids = tokenizer(["Spiele etwas Jazz", "Joue du jazz"], padding=True, return_tensors="pt")
    states = torch.randn(*input_ids["input_ids"].shape, 4)
    mask = input_ids["attention_mask"]
    special = special_tokens_mask(input_ids["input_ids"], tokenizer)
    assert special[:, 0].all() and not special[mask.bool()][1:].all()  # BOS is special, words are not
    assert special[~mask.bool()].all()  # padding is a special token
    expected = {
        "mean": plain_pool(states, mask),
        "mean_no_special": plain_pool(states, mask * ~special),
        "last": last_token_pool(states, mask),
    }
    assert set(expected) == set(POOLINGS)
    for mode, value in expected.items():
        torch.testing.assert_close(pool(states, mask, mode, special), value)
    with pytest.raises(ValueError, match="needs the special_tokens_mask"):
        pool(states, mask, "mean_no_special")
    with pytest.raises(ValueError, match=r"pooling='max' is not supported; choose one of \['mean'"):
        pool(states, mask, "max")
