"""EMA with buffers: decay 0 copies everything, decay d follows the formula, integer buffers are copied."""

import torch
from torch import nn

from diffusers_repae import LatentBatchNorm, build_component
from diffusers_repae.training.ema import ModelEMA, update_ema


def _model():
    return nn.ModuleDict({"lin": nn.Linear(3, 2), "norm": LatentBatchNorm(2)})


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model["norm"](torch.randn(8, 2, 4, 4) * 3 + 1)  # train mode: moves running stats, counts a batch


def test_decay_zero_copies_parameters_and_buffers():
    torch.manual_seed(0)
    model = _model()
    ema = ModelEMA(model, decay=0.9999)
    _perturb(model)
    ema.step(model, decay=0.0)
    for (name, a), b in zip(ema.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_decay_formula_for_floats_and_copy_for_integers():
    torch.manual_seed(0)
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    _perturb(model)
    ema.step(model)
    after, current = ema.model.state_dict(), model.state_dict()
    for key in ("lin.weight", "lin.bias", "norm.running_mean", "norm.running_var"):
        torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * current[key])
    assert after["norm.num_batches_tracked"].item() == current["norm.num_batches_tracked"].item() == 1
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_skips_derived_buffers_and_round_trips_state():
    torch.manual_seed(0)
    sit = build_component("tiny-cpu", "transformer", num_layers=1, hidden_size=32, num_attention_heads=2)
    ema = ModelEMA(sit, decay=0.5)
    pos = ema.model.pos_embed.clone()
    with torch.no_grad():
        sit.pos_embed.mul_(2)  # not a real state: the EMA must leave its own copy alone
    ema.step(sit)
    assert torch.equal(ema.model.pos_embed, pos)
    other = ModelEMA(build_component("tiny-cpu", "transformer", num_layers=1, hidden_size=32, num_attention_heads=2))
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5
    for a, b in zip(other.model.parameters(), ema.model.parameters()):
        assert torch.equal(a, b)


def test_update_ema_rejects_bad_decay():
    import pytest

    with pytest.raises(ValueError, match="decay"):
        update_ema(_model(), _model(), decay=1.5)


def test_warmup_follows_the_formula_and_keeps_untrained_values_bit_identical():
    """Fine-tuning EMA (issue 13 item 9): decay min(d, (1 + n) / (10 + n)) at update n; frozen values untouched."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"trained": nn.Linear(3, 2), "frozen": nn.Linear(3, 2), "table": nn.Embedding(4, 3)})
    model["frozen"].requires_grad_(False)
    ema = ModelEMA(model, decay=0.9999, warmup=True)
    expected = {k: v.clone().double() for k, v in ema.model.state_dict().items()}
    frozen_before = {k: v.clone() for k, v in model["frozen"].state_dict().items()}
    for n in range(5):
        with torch.no_grad():
            model["trained"].weight.add_(torch.randn(2, 3))
            model["table"].weight[2:].add_(torch.randn(2, 3))  # rows 0-1 play the masked (old) label rows
        decay = min(0.9999, (1 + n) / (10 + n))
        assert ema.current_decay() == decay
        ema.step(model)
        for key, value in model.state_dict().items():
            expected[key] = decay * expected[key] + (1 - decay) * value.double()
    after = ema.model.state_dict()
    for key in ("trained.weight", "trained.bias", "table.weight"):
        torch.testing.assert_close(after[key].double(), expected[key], atol=1e-6, rtol=0)
    assert torch.equal(after["table.weight"][:2], model["table"].weight[:2])  # bit-identical, not just close
    for key, value in frozen_before.items():
        assert torch.equal(after[f"frozen.{key}"], value)
    assert ema.num_updates == 5
    restored = ModelEMA(model, decay=0.9999, warmup=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 5 and restored.current_decay() == min(0.9999, 6 / 15)


def test_plain_ema_keeps_the_original_formula_bit_for_bit():
    torch.manual_seed(0)
    model = _model()
    ema = ModelEMA(model, decay=0.99)
    reference = {k: v.clone() for k, v in ema.model.named_parameters()}
    _perturb(model)
    ema.step(model)
    for name, param in model.named_parameters():  # the original: ema.mul_(decay).add_(param, alpha=1 - decay)
        assert torch.equal(ema.model.get_parameter(name), reference[name].mul_(0.99).add_(param, alpha=1 - 0.99))
