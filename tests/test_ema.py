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
