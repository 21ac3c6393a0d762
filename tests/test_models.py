"""The network: exact parameter counts, shapes, task isolation, fused ops, input checks."""

from __future__ import annotations

import pytest
import torch

from models import build_model, count_parameters
from models.params import freeze_for_task, parameter_counts, split_parameters

FIVE_MODALITIES = [1, 1, 1, 2, 1]  # Heart, Liver, Hippocampus, Prostate, Pancreas
FIVE_CLASSES = [2, 2, 3, 3, 2]


@pytest.mark.parametrize(
    ("mode", "module", "mods", "classes", "pools", "expected"),
    [
        ("independent", None, [1], [2], (5, 5, 5), 33_113_214),
        ("independent", None, [1], [2], (4, 5, 5), 33_113_214),
        ("independent", None, [1], [3], (3, 3, 3), 2_055_285),
        ("independent", None, [2], [3], (2, 5, 5), 33_113_765),
        ("shared", None, FIVE_MODALITIES, FIVE_CLASSES, (5, 5, 5), 33_152_724),
        ("universal", "series_adapter", FIVE_MODALITIES, FIVE_CLASSES, (5, 5, 5), 38_009_124),
        ("universal", "parallel_adapter", FIVE_MODALITIES, FIVE_CLASSES, (5, 5, 5), 38_847_044),
        ("universal", "separable_adapter", FIVE_MODALITIES, FIVE_CLASSES, (5, 5, 5), 6_577_460),
    ],
)
def test_paper_parameter_counts(mode, module, mods, classes, pools, expected):
    model = build_model(mode, mods, classes, module=module, pools_per_axis=pools)
    assert count_parameters(model) == expected


def test_five_independent_models_total():
    pools = [(4, 5, 5), (5, 5, 5), (3, 3, 3), (2, 5, 5), (4, 5, 5)]
    total = sum(
        count_parameters(build_model("independent", [m], [k], pools_per_axis=p))
        for m, k, p in zip(FIVE_MODALITIES, FIVE_CLASSES, pools, strict=True)
    )
    assert total == 134_508_692


MODES = [
    ("independent", None),
    ("shared", None),
    ("universal", "separable_adapter"),
    ("universal", "series_adapter"),
    ("universal", "parallel_adapter"),
]


@pytest.mark.parametrize(("mode", "module"), MODES)
@pytest.mark.parametrize(
    ("pools", "size"), [((1, 2, 2), (2, 8, 12)), ((2, 3, 1), (8, 16, 6)), ((3, 3, 3), (8, 8, 16))]
)
def test_output_shapes_every_task(mode, module, pools, size):
    mods, classes = ([2], [3]) if mode == "independent" else ([1, 2, 1], [2, 3, 4])
    model = build_model(mode, mods, classes, module=module, base_channels=4, pools_per_axis=pools)
    for t, (m, k) in enumerate(zip(mods, classes, strict=True)):
        y = model(torch.randn(2, m, *size), t)
        assert y.shape == (2, k, *size)


@pytest.mark.parametrize("deep_supervision", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_options_change_the_network(deep_supervision, residual):
    model = build_model(
        "universal",
        [1],
        [2],
        base_channels=4,
        pools_per_axis=3,
        deep_supervision=deep_supervision,
        residual=residual,
    )
    assert model(torch.randn(1, 1, 8, 8, 8), 0).shape == (1, 2, 8, 8, 8)
    assert bool(model.ds_heads) == deep_supervision
    assert all(enc.residual == residual for enc in model.encoders)


@pytest.mark.parametrize(("mode", "module"), MODES[1:])
def test_gradients_stay_in_task_and_shared_parameters(mode, module):
    torch.manual_seed(0)
    model = build_model(mode, [1, 1, 2], [2, 3, 2], module=module, base_channels=4, pools_per_axis=(1, 2, 2))
    split = split_parameters(model)
    model(torch.randn(1, 1, 4, 8, 8), 1).square().mean().backward()
    params = dict(model.named_parameters())
    for t, names in enumerate(split.per_task):
        has_grad = [params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in names]
        if t == 1:
            assert sum(has_grad) > 0.5 * len(names)  # (biases before a norm get exactly zero grads)
        else:
            assert not any(has_grad), f"task {t} got gradients from a task-1 pass"
    assert all(params[n].grad is not None for n in split.shared)


def test_parameter_split_covers_everything_once():
    model = build_model("universal", FIVE_MODALITIES, FIVE_CLASSES)
    split = split_parameters(model)
    names = split.shared + [n for task in split.per_task for n in task]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    counts = parameter_counts(model)
    assert counts.shared + sum(counts.per_task) == counts.total == 6_577_460
    # the pointwise convs are shared, the depthwise adapters are not
    assert any("pointwise" in n for n in split.shared)
    assert all("depthwise." not in n for n in split.shared)


@pytest.mark.parametrize(("mode", "module"), MODES[1:])
def test_adding_a_task_leaves_old_tasks_bit_identical(mode, module):
    torch.manual_seed(0)
    model = build_model(mode, [1, 2], [2, 3], module=module, base_channels=4, pools_per_axis=(1, 2, 2))
    model.eval()
    xs = [torch.randn(1, 1, 4, 8, 8), torch.randn(1, 2, 4, 8, 8)]
    before = [model(x, t) for t, x in enumerate(xs)]
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    new_t = model.add_task(in_channels=3, num_classes=4, init_from=0)
    assert new_t == 2 and model.config.in_channels == [1, 2, 3] and model.config.num_classes == [2, 3, 4]
    after = [model(x, t) for t, x in enumerate(xs)]
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in old_state.items())
    assert model(torch.randn(1, 3, 4, 8, 8), new_t).shape == (1, 4, 4, 8, 8)
    # a fresh model built with three tasks has the same parameter names and shapes
    fresh = build_model(mode, [1, 2, 3], [2, 3, 4], module=module, base_channels=4, pools_per_axis=(1, 2, 2))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in state.items()}


def test_freeze_for_new_task_trains_only_its_parameters():
    model = build_model("universal", [1, 1], [2, 2], base_channels=4, pools_per_axis=2)
    new_t = model.add_task(1, 3)
    trainable = set(freeze_for_task(model, new_t))
    split = split_parameters(model)
    assert trainable == set(split.per_task[new_t])
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in trainable)
    # a training step on the new task changes nothing of the others
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=5e-4)
    model(torch.randn(1, 1, 4, 4, 4), new_t).square().mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable


@pytest.mark.parametrize(("mode", "module"), MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_ops_match_plain_modules(mode, module, channels_last):
    torch.manual_seed(0)
    n = 1 if mode == "independent" else 2
    model = build_model(
        mode, [1, 2][:n], [2, 3][:n], module=module, base_channels=4, pools_per_axis=(1, 2, 2)
    )
    model = model.double()
    x = torch.randn(2, 1, 4, 8, 12, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    results = []
    for fused in (True, False):
        model.set_fused_ops(fused)
        model.zero_grad()
        y = model(x, 0)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append(
            (y.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        )
    (y_f, g_f), (y_p, g_p) = results
    torch.testing.assert_close(y_f, y_p, rtol=1e-10, atol=1e-10)
    assert g_f.keys() == g_p.keys()
    for k in g_f:
        torch.testing.assert_close(g_f[k], g_p[k], rtol=1e-8, atol=1e-10, msg=k)


def test_features_for_visualisation():
    model = build_model("universal", [1], [2], base_channels=4, pools_per_axis=2)
    x = torch.randn(1, 1, 8, 8, 8)
    logits, parts = model.forward_features(x, 0)
    assert torch.equal(logits, model(x, 0))
    assert parts.shared.shape == parts.task.shape == (1, 4, 8, 8, 8)


def test_bad_input_size_names_axis_and_working_sizes():
    model = build_model("independent", [1], [2], base_channels=4, pools_per_axis=(2, 3, 3))
    with pytest.raises(ValueError, match=r"axis H has size 20, not divisible by 8.*16 or 24"):
        model(torch.randn(1, 1, 8, 20, 16), 0)
    with pytest.raises(ValueError, match="takes 1 modality"):
        model(torch.randn(1, 2, 8, 16, 16), 0)
    with pytest.raises(IndexError, match="out of range"):
        model(torch.randn(1, 1, 8, 16, 16), 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_mode": "joint"}, "train_mode must be one of"),
        ({"train_mode": "universal", "module": "bottleneck"}, "module must be one of"),
        ({"train_mode": "shared", "module": "series_adapter"}, "only used by train_mode='universal'"),
        (
            {"train_mode": "independent", "in_channels": [1, 1], "num_classes": [2, 2]},
            "one model for one task",
        ),
        ({"train_mode": "shared", "in_channels": [1], "num_classes": [2, 2]}, "same length"),
        ({"train_mode": "shared", "pools_per_axis": (1, 2)}, "3 ints"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    args = {"train_mode": "shared", "in_channels": [1], "num_classes": [2], **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model(args.pop("train_mode"), args.pop("in_channels"), args.pop("num_classes"), **args)


def test_initialisation_kaiming_and_zero_bias():
    torch.manual_seed(0)
    model = build_model("universal", [1], [2], base_channels=16, pools_per_axis=2)
    conv = model.encoders[0].unit1.pointwise  # 16 -> 16, 1x1x1: fan_in 16
    assert torch.count_nonzero(conv.bias) == 0
    assert conv.weight.std().item() == pytest.approx((2 / 16) ** 0.5, rel=0.15)
    dw = model.encoders[0].unit1.depthwise[0]  # fan_in 27
    assert dw.weight.std().item() == pytest.approx((2 / 27) ** 0.5, rel=0.15)
