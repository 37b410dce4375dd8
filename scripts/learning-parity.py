#!/usr/bin/env python3
"""Learning parity: the same synthetic dataset and the same recipe trained by semseg and by a small PyTorch script.

Both sides: a `semseg synth` dataset; ResNet-18 with output stride 8 (layer3/layer4 dilated, semseg's dilated basic
block: both 3x3 convs of a block use its dilation), torchvision's FCNHead on layer4 plus an auxiliary FCNHead on
layer3 (loss weight 0.4), per-pixel cross-entropy ignoring 255, SGD (momentum 0.9, weight decay 1e-4), poly learning
rate (power 0.9) per iteration, the same augmentation (flip, long side to base_size x U[0.5, 2], pad with the mean
colour / 255, random crop, ImageNet normalisation), validation on whole images with mIOU over the classes present in
prediction or truth. Weights are random on both sides (init seeds differ: that is the point).

    scripts/learning-parity.py --semseg target/release/semseg [--epochs 12] [--threads 2] [--out DIR]

Prints each side's per-epoch validation mIOU and one JSON summary line; exits 1 when semseg's best mIOU is more than
--tolerance (0.02) below PyTorch's. Needs torch and torchvision (pip install torch torchvision).
"""
import argparse
import json
import math
import pathlib
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.resnet import ResNet
from torchvision.models.segmentation.fcn import FCNHead

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IGNORE = 255


class DilatedBasicBlock(nn.Module):
    """torchvision's BasicBlock, with the dilation applied to both 3x3 convs (as semseg does; torchvision refuses)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Fcn(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.backbone = ResNet(DilatedBasicBlock, [2, 2, 2, 2], replace_stride_with_dilation=[False, True, True])
        self.classifier = FCNHead(512, num_classes)
        self.aux_classifier = FCNHead(256, num_classes)

    def forward(self, x):
        size = x.shape[-2:]
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        c4 = b.layer4(c3)
        out = F.interpolate(self.classifier(c4), size=size, mode="bilinear", align_corners=False)
        aux = F.interpolate(self.aux_classifier(c3), size=size, mode="bilinear", align_corners=False)
        return out, aux


def load_pairs(data, split):
    images = sorted((data / split).glob("*.jpg"))
    # Annotations are palette PNGs whose indices are the labels: keep the indices (mode L), not the colours.
    label = lambda p: Image.fromarray(np.asarray(Image.open(data / f"{split}_annotation" / (p.stem + ".png"))))
    return [(Image.open(p).convert("RGB"), label(p)) for p in images]


def normalise(img):
    return torch.from_numpy(((np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy())


def train_transform(img, mask, base_size, crop, rng):
    """GluonCV's _sync_transform, long-side variant, padding with the mean colour / ignore (as semseg)."""
    if rng.random() < 0.5:
        img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = img.size
    long_size = rng.randint(int(base_size * 0.5), int(base_size * 2.0))
    if h > w:
        oh, ow = long_size, int(1.0 * w * long_size / h + 0.5)
    else:
        ow, oh = long_size, int(1.0 * h * long_size / w + 0.5)
    img, mask = img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)
    if min(ow, oh) < crop:
        pw, ph = max(crop - ow, 0), max(crop - oh, 0)
        canvas = Image.new("RGB", (ow + pw, oh + ph), tuple(int(round(m * 255)) for m in MEAN))
        canvas.paste(img, (0, 0))
        labels = Image.new("L", (ow + pw, oh + ph), IGNORE)
        labels.paste(mask, (0, 0))
        img, mask = canvas, labels
    w, h = img.size
    x1, y1 = rng.randint(0, w - crop), rng.randint(0, h - crop)
    img, mask = img.crop((x1, y1, x1 + crop, y1 + crop)), mask.crop((x1, y1, x1 + crop, y1 + crop))
    return normalise(img), torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


def miou(model, pairs, num_classes):
    model.eval()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.no_grad():
        for img, mask in pairs:
            pred = model(normalise(img)[None])[0].argmax(1)[0].numpy()
            truth = np.asarray(mask, dtype=np.int64)
            keep = truth != IGNORE
            confusion += np.bincount(truth[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(
                num_classes, num_classes)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()), float(inter.sum() / max(confusion.sum(), 1))


def train_torch(data, hp, seed, threads):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    train, val = load_pairs(data, "train"), load_pairs(data, "validation")
    c, batch, epochs = int(hp["num_classes"]), int(hp["mini_batch_size"]), int(hp["epochs"])
    model = Fcn(c)
    opt = torch.optim.SGD(model.parameters(), lr=float(hp["learning_rate"]), momentum=0.9, weight_decay=1e-4)
    iters_per_epoch = max(int(hp["num_training_samples"]) // batch, 1)
    total = epochs * iters_per_epoch
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        t0, losses = time.time(), []
        for i in range(iters_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            samples = [train_transform(*train[j], int(hp["base_size"]), int(hp["crop_size"]), rng) for j in idx]
            x, y = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
            for g in opt.param_groups:
                g["lr"] = float(hp["learning_rate"]) * (1 - step / total) ** 0.9
            out, aux = model(x)
            loss = F.cross_entropy(out, y, ignore_index=IGNORE) + 0.4 * F.cross_entropy(aux, y, ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        m, acc = miou(model, val, c)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_miou": m,
                        "validation_pixel_accuracy": acc, "seconds": round(time.time() - t0, 1)})
        print(f"torch  epoch {epoch}: loss {np.mean(losses):.4f} mIOU {m:.4f} pixel accuracy {acc:.4f}", flush=True)
    return history


def train_semseg(binary, ml, hp, threads):
    config = ml / "input/config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hp.items()}))
    env = {"RAYON_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    subprocess.run([binary, "--ml-root", str(ml), "train"], check=True, env=env)
    history = json.loads((ml / "output/data/history.json").read_text())
    history = history.get("epochs", history) if isinstance(history, dict) else history
    for h in history:
        print(f"semseg epoch {h['epoch']}: loss {h['train_loss']:.4f} mIOU {h['validation_miou']:.4f}", flush=True)
    return history


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--semseg", default="target/release/semseg")
    p.add_argument("--out", help="working directory (default: a temporary one)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-count", type=int, default=24)
    p.add_argument("--validation-count", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=5, help="dataset seed")
    p.add_argument("--tolerance", type=float, default=0.02)
    a = p.parse_args()

    work = pathlib.Path(a.out or tempfile.mkdtemp(prefix="semseg-parity-")).resolve()
    ml = work / "ml"
    data = ml / "input/data"
    subprocess.run([a.semseg, "synth", "--out", str(data), "--seed", str(a.seed), "--train-count", str(a.train_count),
                    "--validation-count", str(a.validation_count), "--width", "64", "--height", "48"], check=True)
    hp = {"num_classes": 4, "num_training_samples": a.train_count, "backbone": "resnet-18", "algorithm": "fcn",
          "use_pretrained_model": "False", "crop_size": 48, "base_size": 64, "epochs": a.epochs,
          "mini_batch_size": 4, "validation_mini_batch_size": 1, "learning_rate": 0.02, "optimizer": "sgd",
          "momentum": 0.9, "weight_decay": 0.0001, "lr_scheduler": "poly", "output_stride": 8, "seed": 1}
    t0 = time.time()
    semseg = train_semseg(a.semseg, ml, hp, a.threads)
    semseg_s = time.time() - t0
    t0 = time.time()
    torch_h = train_torch(data, hp, seed=1, threads=a.threads)
    torch_s = time.time() - t0
    best = lambda h: max(e["validation_miou"] for e in h)
    summary = {
        "recipe": hp, "dataset": {"seed": a.seed, "train": a.train_count, "validation": a.validation_count},
        "semseg": {"best_miou": round(best(semseg), 4), "final_miou": round(semseg[-1]["validation_miou"], 4),
                   "seconds": round(semseg_s, 1)},
        "torch": {"best_miou": round(best(torch_h), 4), "final_miou": round(torch_h[-1]["validation_miou"], 4),
                  "seconds": round(torch_s, 1), "version": torch.__version__},
    }
    summary["semseg_minus_torch_best"] = round(best(semseg) - best(torch_h), 4)
    summary["pass"] = best(semseg) >= best(torch_h) - a.tolerance
    print(json.dumps(summary), flush=True)
    sys.exit(0 if summary["pass"] else 1)


if __name__ == "__main__":
    main()
