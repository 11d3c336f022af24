"""TimmClassifier: argument passing, local-only weight loading, head dropping, missing extra."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distillkit.models.timm import TimmClassifier

TIMM_REASON = "timm is an optional extra (it needs torchvision, which does not install beside the CPU torch used here)"


class _TinyNet(nn.Module):
    """What the stand-in create_model builds: a conv backbone and a linear head, timm-style."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)
        self.pretrained_cfg = {"classifier": "head"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stem(x)).relu().mean(dim=(2, 3)))


@pytest.fixture
def fake_timm(monkeypatch):
    """Install a tiny stand-in `timm` module that records every create_model call."""
    calls: list[dict] = []
    module = types.ModuleType("timm")

    def create_model(model_name, pretrained=False, num_classes=1000, in_chans=3):
        calls.append(dict(model_name=model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans))
        return _TinyNet(num_classes, in_chans)

    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls


def _trained_weights(num_classes: int, in_chans: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    net = _TinyNet(num_classes, in_chans)
    for p in net.parameters():
        nn.init.normal_(p)
    net.norm.running_mean.normal_()
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def test_stand_in_timm_arguments_loading_and_head_drop(fake_timm, tmp_path) -> None:
    model = TimmClassifier("tiny_net", num_classes=7, in_channels=1)
    assert fake_timm == [dict(model_name="tiny_net", pretrained=False, num_classes=7, in_chans=1)]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)

    # Same head size: every tensor, head included, comes from the safetensors file.
    weights = _trained_weights(num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    same = TimmClassifier("tiny_net", num_classes=10, pretrained_path=str(path))
    assert same.dropped_head_keys == []
    for key, value in same.model.state_dict().items():
        assert torch.equal(value, weights[key]), key

    # Other head size: backbone loaded, mismatched head dropped and left freshly initialised.
    other = TimmClassifier("tiny_net", num_classes=5, pretrained_path=str(path))
    assert sorted(other.dropped_head_keys) == ["head.bias", "head.weight"]
    sd = other.model.state_dict()
    for key in ("stem.weight", "stem.bias", "norm.weight", "norm.running_mean"):
        assert torch.equal(sd[key], weights[key]), key
    assert sd["head.weight"].shape == (5, 4)
    assert other(torch.randn(2, 3, 8, 8)).shape == (2, 5)

    # A mismatch outside the head is an error, not a silent partial load.
    with pytest.raises(ValueError, match="stem.weight"):
        TimmClassifier("tiny_net", num_classes=10, in_channels=1, pretrained_path=str(path))

    # A torch checkpoint wrapped as {"state_dict": ...} with DDP's "module." prefix also loads.
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}, pt)
    wrapped = TimmClassifier("tiny_net", num_classes=10, pretrained_path=str(pt))
    assert torch.equal(wrapped.model.head.weight, weights["head.weight"])

    # A missing file names the config key and does not fall back to downloading.
    with pytest.raises(FileNotFoundError, match="model.pretrained_path"):
        TimmClassifier("tiny_net", pretrained_path=str(tmp_path / "absent.safetensors"))


def test_missing_timm_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"distillkit\[timm\]") as info:
        TimmClassifier("resnet18")
    assert "torchvision" in str(info.value)


def test_real_timm_resnet18_head_drop(tmp_path) -> None:
    pytest.importorskip("timm", reason=TIMM_REASON)
    torch.manual_seed(0)
    source = TimmClassifier("resnet18", num_classes=10)
    assert source(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))

    target = TimmClassifier("resnet18", num_classes=7, pretrained_path=str(path))
    assert sorted(target.dropped_head_keys) == ["fc.bias", "fc.weight"]
    assert torch.equal(target.model.conv1.weight, source.model.conv1.weight)
    assert target(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_real_timm_in_channels(tmp_path) -> None:
    pytest.importorskip("timm", reason=TIMM_REASON)
    model = TimmClassifier("resnet18", num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
