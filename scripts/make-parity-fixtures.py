#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures the model tests compare against (committed; < 2 MB in all).

tests/fixtures/parity/*.safetensors  small layer-level cases, f32, seeded:
  bilinear.safetensors     F.interpolate(bilinear, align_corners=False) up and down, odd sizes, with input gradients
  pool.safetensors         MaxPool2d(3, 2, 1) and adaptive_avg_pool2d with bins that do not divide, with gradients
  batchnorm.safetensors    BatchNorm2d in eval and train mode (outputs, updated running stats, input gradient)
  bottleneck_*.safetensors torchvision Bottleneck with dilation 2, and with stride 2 on an odd×even input
  aspp.safetensors         torchvision ASPP (rates 2/3/5, 16 channels) with image pooling, eval
  psp.safetensors          the peer's PSPHead (bins 1/2/3/6) on a 7×10 map that the bins do not divide, eval
  Each holds `m.<param>` (the module's state dict), `in.*`, `out.*`, `grad.*` (input gradients for the upstream
  gradient `gout.*`) and `after.<param>` (running stats after one training step).
tests/fixtures/torchvision-keys/{fcn,deeplabv3,pspnet}_resnet{18,34}.txt
  Key lists for the light backbones, which torchvision does not build: the resnet18/34 state dict under
  `backbone.` (no fc) plus torchvision's FCNHead / DeepLabHead on 512 channels and the aux FCNHead on 256
  (fcn, deeplabv3), or the peer's PSPHead with ch = 512/4 (pspnet, no aux), same format as the other lists.

Setup (PyTorch from PyPI, about 3 GB; see ../shared/bench/peer/README.md):
  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch torchvision safetensors
  /tmp/torchvenv/bin/python scripts/make-parity-fixtures.py          # from the repository root
"""
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet18, resnet34
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = os.path.join(ROOT, "tests", "fixtures", "parity")
KEYS = os.path.join(ROOT, "tests", "fixtures", "torchvision-keys")


def _cbr(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PSPHead(nn.Module):
    """Copy of ../shared/bench/peer/seg_models.py's PSPHead (kept here so the script runs on its own)."""

    def __init__(self, cin=2048, num_classes=21, ch=512, bins=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), _cbr(cin, ch, 1)) for b in bins)
        self.bottleneck = _cbr(cin + len(bins) * ch, ch, 3)
        self.cls = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(ch, num_classes, 1))

    def forward(self, x):
        size = x.shape[-2:]
        feats = [x] + [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return self.cls(self.bottleneck(torch.cat(feats, 1)))


def randomise_batchnorm(model, gen):
    """As export_reference.py: eval-mode BN must not be the identity for the comparison to mean anything."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def state(model):
    return {f"m.{k}": v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def write(name, tensors):
    path = os.path.join(PARITY, name)
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, path)
    print(f"{path}: {os.path.getsize(path)} bytes")


def grad_of(fn, x, gen):
    """Output of fn(x) and d(sum(out * g))/dx for a random g; returns (out, g, grad)."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    g = torch.randn(out.shape, generator=gen)
    (gx,) = torch.autograd.grad(out, x, g)
    return out.detach(), g, gx


def bilinear(gen):
    t = {}
    x = torch.randn(2, 3, 7, 5, generator=gen)
    t["in.x"] = x
    for i, size in enumerate([(11, 13), (3, 2), (4, 9), (7, 8), (1, 1)]):
        out, g, gx = grad_of(lambda v: F.interpolate(v, size=size, mode="bilinear", align_corners=False), x, gen)
        t[f"out.{i}"], t[f"gout.{i}"], t[f"grad.{i}"] = out, g, gx
    write("bilinear.safetensors", t)


def pool(gen):
    t = {}
    for i, shape in enumerate([(2, 3, 9, 6), (1, 2, 8, 11)]):
        x = torch.randn(*shape, generator=gen)
        out, g, gx = grad_of(lambda v: F.max_pool2d(v, 3, 2, 1), x, gen)
        t[f"max.in.{i}"], t[f"max.out.{i}"], t[f"max.gout.{i}"], t[f"max.grad.{i}"] = x, out, g, gx
    x = torch.randn(2, 3, 7, 10, generator=gen)
    t["avg.in"] = x
    for i, size in enumerate([(1, 1), (2, 2), (3, 3), (6, 6), (2, 5)]):
        out, g, gx = grad_of(lambda v: F.adaptive_avg_pool2d(v, size), x, gen)
        t[f"avg.out.{i}"], t[f"avg.gout.{i}"], t[f"avg.grad.{i}"] = out, g, gx
    write("pool.safetensors", t)


def train_and_eval(name, module, x, gen):
    """Eval output; then one train-mode forward (output, input gradient, running stats after)."""
    randomise_batchnorm(module, gen)
    t = state(module)
    t["in.x"] = x
    module.eval()
    with torch.no_grad():
        t["out.eval"] = module(x)
    module.train()
    out, g, gx = grad_of(module, x, gen)
    t["out.train"], t["gout.train"], t["grad.train"] = out, g, gx
    for k, v in module.state_dict().items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            t[f"after.{k}"] = v
    write(name, t)


def batchnorm(gen):
    train_and_eval("batchnorm.safetensors", nn.BatchNorm2d(6), torch.randn(3, 6, 5, 4, generator=gen) * 2 + 1, gen)


def bottlenecks(gen):
    # Dilated block (layer3/4 at output stride 8): stride 1, dilation 2, with a projection shortcut.
    ds = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
    block = Bottleneck(16, 4, stride=1, downsample=ds, dilation=2)
    train_and_eval("bottleneck_dilated.safetensors", block, torch.randn(2, 16, 9, 7, generator=gen), gen)
    # First block of layer2: stride 2 on the 3×3 conv (v1.5) and the shortcut, odd height and even width.
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    block = Bottleneck(16, 8, stride=2, downsample=ds)
    train_and_eval("bottleneck_stride2.safetensors", block, torch.randn(2, 16, 9, 8, generator=gen), gen)


def aspp(gen):
    module = ASPP(8, [2, 3, 5], out_channels=16)
    randomise_batchnorm(module, gen)
    module.eval()
    x = torch.randn(2, 8, 9, 11, generator=gen)
    t = state(module)
    t["in.x"] = x
    with torch.no_grad():
        t["out.eval"] = module(x)
    write("aspp.safetensors", t)


def psp(gen):
    module = PSPHead(cin=16, num_classes=5, ch=4)
    randomise_batchnorm(module, gen)
    module.eval()
    x = torch.randn(2, 16, 7, 10, generator=gen)
    t = state(module)
    t["in.x"] = x
    with torch.no_grad():
        t["out.eval"] = module(x)
    write("psp.safetensors", t)


def key_lists():
    header = f"# torchvision {torchvision.__version__} {{name}} state_dict: name dtype shape (num_classes=21, derived by scripts/make-parity-fixtures.py)\n"
    for depth, ctor in (("18", resnet18), ("34", resnet34)):
        backbone = {f"backbone.{k}": v for k, v in ctor(weights=None).state_dict().items() if not k.startswith("fc.")}
        heads = {
            "fcn": {"classifier": FCNHead(512, 21), "aux_classifier": FCNHead(256, 21)},
            "deeplabv3": {"classifier": DeepLabHead(512, 21), "aux_classifier": FCNHead(256, 21)},
            "pspnet": {"classifier": PSPHead(cin=512, num_classes=21, ch=128)},
        }
        for algo, parts in heads.items():
            name = f"{algo}_resnet{depth}"
            sd = dict(backbone)
            for prefix, m in parts.items():
                sd.update({f"{prefix}.{k}": v for k, v in m.state_dict().items()})
            with open(os.path.join(KEYS, f"{name}.txt"), "w") as f:
                f.write(header.format(name=name))
                for k, v in sd.items():
                    f.write(f"{k} {str(v.dtype).replace('torch.', '')} {list(v.shape)}\n")
            print(f"{name}: {len(sd)} keys")


def main():
    os.makedirs(PARITY, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bilinear(gen)
    pool(gen)
    batchnorm(gen)
    bottlenecks(gen)
    aspp(gen)
    psp(gen)
    key_lists()
    total = sum(os.path.getsize(os.path.join(PARITY, f)) for f in os.listdir(PARITY))
    print(f"parity fixtures: {total} bytes in all")
    if total > 2_000_000:
        sys.exit("fixtures exceed 2 MB")


if __name__ == "__main__":
    main()
