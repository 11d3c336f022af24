"""CIFAR ResNets and Wide ResNets: shapes, exact parameter counts and checkpoint keys that
match RepDistiller / mdistiller, so their published checkpoints load strictly."""

from __future__ import annotations

import pytest
import torch

from distillkit.models import cifar_resnet, wrn

# Exact trainable-parameter counts with a 100-class head, computed from the reference
# definitions (RepDistiller models/resnet.py, models/wrn.py; identical in mdistiller).
PARAMS_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
}

# Length of state_dict() (parameters + BN buffers incl. num_batches_tracked), as in the references.
NUM_KEYS = {
    "resnet8": 56,
    "resnet14": 92,
    "resnet20": 128,
    "resnet32": 200,
    "resnet44": 272,
    "resnet56": 344,
    "resnet110": 668,
    "resnet8x4": 62,
    "resnet32x4": 206,
    "wrn_16_1": 82,
    "wrn_16_2": 83,
    "wrn_40_1": 226,
    "wrn_40_2": 227,
}

CONSTRUCTORS = {**cifar_resnet.CIFAR_RESNETS, **wrn.WRNS}


def _bn(prefix: str) -> set[str]:
    return {f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def _resnet_block(prefix: str, downsample: bool) -> set[str]:
    keys = {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"} | _bn(f"{prefix}.bn1") | _bn(f"{prefix}.bn2")
    if downsample:
        keys |= {f"{prefix}.downsample.0.weight"} | _bn(f"{prefix}.downsample.1")
    return keys


def _wrn_block(prefix: str, shortcut: bool) -> set[str]:
    keys = {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"} | _bn(f"{prefix}.bn1") | _bn(f"{prefix}.bn2")
    if shortcut:
        keys.add(f"{prefix}.convShortcut.weight")
    return keys


def test_resnet8x4_keys_written_out() -> None:
    """The full key set of resnet8x4, written by hand from RepDistiller's module tree."""
    expected = {"conv1.weight", "fc.weight", "fc.bias"} | _bn("bn1")
    for stage in (1, 2, 3):  # stem 32 -> 64 channels, so layer1.0 also has a projection
        expected |= _resnet_block(f"layer{stage}.0", downsample=True)
    assert set(cifar_resnet.resnet8x4().state_dict()) == expected


def test_resnet56_keys_written_out() -> None:
    expected = {"conv1.weight", "fc.weight", "fc.bias"} | _bn("bn1")
    for stage in (1, 2, 3):
        for i in range(9):
            # layer1 keeps 16 channels at stride 1: no projection; layer2/3 project in block 0.
            expected |= _resnet_block(f"layer{stage}.{i}", downsample=(i == 0 and stage > 1))
    sd = cifar_resnet.resnet56().state_dict()
    assert set(sd) == expected
    assert "layer3.4.bn2.running_var" in sd
    assert "layer1.0.downsample.0.weight" not in sd
    assert sd["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert sd["fc.weight"].shape == (100, 64)


def test_wrn_40_2_keys_written_out() -> None:
    expected = {"conv1.weight", "fc.weight", "fc.bias"} | _bn("bn1")
    for stage in (1, 2, 3):
        for i in range(6):
            # 16 -> 32 channels in block1 too (widen 2), so each stage's block 0 projects.
            expected |= _wrn_block(f"block{stage}.layer.{i}", shortcut=(i == 0))
    sd = wrn.wrn_40_2().state_dict()
    assert set(sd) == expected
    assert "block3.layer.5.conv2.weight" in sd
    assert sd["block3.layer.0.convShortcut.weight"].shape == (128, 64, 1, 1)
    assert sd["bn1.running_var"].shape == (128,)
    assert sd["fc.weight"].shape == (100, 128)


def test_wrn_16_1_has_no_shortcut_in_first_stage() -> None:
    sd = wrn.wrn_16_1().state_dict()
    assert "block1.layer.0.convShortcut.weight" not in sd
    assert "block2.layer.0.convShortcut.weight" in sd


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_shape_params_keys_and_checkpoint(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    make = CONSTRUCTORS[name]
    model = make(num_classes=100, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == PARAMS_100[name]
    assert len(model.state_dict()) == NUM_KEYS[name]

    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 100)

    # RepDistiller saves {"model": state_dict, ...}; it must load strictly into a fresh instance.
    path = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict(), "epoch": 240}, path)
    fresh = make(num_classes=100, in_channels=3)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fresh.load_state_dict(ckpt["model"], strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), logits)


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "wrn_16_1"])
def test_num_classes_and_in_channels(name: str) -> None:
    model = CONSTRUCTORS[name](num_classes=10, in_channels=1)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 10)
    assert model.conv1.weight.shape[1] == 1


def test_default_is_cifar100() -> None:
    assert cifar_resnet.resnet20()(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert wrn.wrn_16_2()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_bottleneck_and_bad_depth() -> None:
    model = cifar_resnet.ResNet(29, [16, 16, 32, 64], "bottleneck", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.fc.in_features == 256
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet.ResNet(21, [16, 16, 32, 64], "basicblock")
    with pytest.raises(ValueError, match="6n\\+4"):
        wrn.WideResNet(17, 100, 2)


def test_hooked_features_survive_the_forward() -> None:
    """Features taken with forward hooks are not overwritten by later in-place ops."""
    torch.manual_seed(0)
    model = cifar_resnet.resnet20().eval()
    seen = {}
    for name in ("layer1.2.bn2", "layer1.2.preact", "layer1", "bn1"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, (o, o.clone()))
        )
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for name, (kept, copy) in seen.items():
        assert torch.equal(kept, copy), name
    # the stage output is relu(preact) of its last block; preact has negatives
    assert torch.equal(seen["layer1"][0], seen["layer1.2.preact"][0].relu())
    assert (seen["layer1.2.preact"][0] < 0).any()
