"""Learning-rate schedule against closed-form values, and the optimizer's parameter groups."""
import math

import pytest
import torch

from models import build_model
from utils.schedule import WarmupCosine, build_optimizer, param_groups


def test_warmup_is_linear_from_base_over_warmup_steps():
    s = WarmupCosine(base_lr=0.4, total_steps=100, warmup_steps=10)
    # step k < 10 uses 0.4 * (k + 1) / 10: 0.04, 0.08, ..., 0.4
    assert [round(s.lr_at(k), 12) for k in range(10)] == [round(0.04 * (k + 1), 12) for k in range(10)]


def test_cosine_closed_form_after_warmup():
    base, lo, total, warm = 0.1, 0.001, 1000, 50
    s = WarmupCosine(base, total, warm, lo)
    assert s.lr_at(50) == pytest.approx(0.1)  # first post-warmup step: the peak
    assert s.lr_at(525) == pytest.approx(lo + (base - lo) * 0.5)  # half way through the cosine: the midpoint
    assert s.lr_at(50 + 950 // 4) == pytest.approx(lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * 237 / 950)))
    assert s.lr_at(999) == pytest.approx(lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * 949 / 950)))
    assert s.lr_at(1000) == pytest.approx(lo) and s.lr_at(5000) == pytest.approx(lo)  # past the end: stays at min


def test_no_warmup_starts_at_peak_and_is_monotone():
    s = WarmupCosine(1.0, 20)
    lrs = [s.lr_at(k) for k in range(20)]
    assert lrs[0] == 1.0
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_apply_sets_group_lr_with_multiplier():
    model = build_model("mobilenet_v2", num_classes=3, width_mult=0.25)
    opt = build_optimizer(model, "sgd", 0.2, weight_decay=1e-4, no_wd_norm_bias=True, backbone_lr_mult=0.1)
    s = WarmupCosine(0.2, 10, 4)
    base = s.apply(opt, 1)
    assert base == pytest.approx(0.1)
    lrs = sorted({round(g["lr"], 10) for g in opt.param_groups})
    assert lrs == [pytest.approx(0.01), pytest.approx(0.1)]


def test_param_groups_exclude_norm_and_bias_from_decay():
    model = build_model("mobilenet_v2", num_classes=3, width_mult=0.25)
    groups = param_groups(model, 4e-5, no_wd_norm_bias=True)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = sorted(names[i] for i in decayed)
    # exactly the conv weights and the linear weight decay: no BatchNorm parameter, no bias
    assert all(n.endswith("weight") for n in decayed_names)
    bn_weights = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert not any(n.rsplit(".", 1)[0] in bn_weights for n in decayed_names)
    assert "classifier.1.weight" in decayed_names and "classifier.1.bias" not in decayed_names
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW),
                                      ("rmsprop", torch.optim.RMSprop)])
def test_optimizers(name, cls):
    model = build_model("mobilenet_v2", num_classes=3, width_mult=0.25)
    opt = build_optimizer(model, name, 0.01, nesterov=True, weight_decay=1e-4)
    assert isinstance(opt, cls)
    if name == "sgd":
        assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
