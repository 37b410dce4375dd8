#!/usr/bin/env bash
# Downloads torchvision's ImageNet ResNet weights (the IMAGENET1K_V1 checkpoints that torchvision's own segmentation
# models start from) for use_pretrained_model=True. semseg reads these PyTorch files as they are.
#
#   scripts/fetch-pretrained.sh DIR [BACKBONE...]      BACKBONE: resnet-18 resnet-34 resnet-50 resnet-101
#                                                      (default: resnet-50 resnet-101, the built-in algorithm's)
# Writes DIR/<backbone>.pth. Use DIR as a `pretrained` training channel, or bake it into the training image at
# /opt/semseg/pretrained (Dockerfile.train does). Needs the internet (download.pytorch.org) and curl.
set -euo pipefail
dir=${1:?usage: fetch-pretrained.sh DIR [resnet-18|resnet-34|resnet-50|resnet-101]...}
shift
[ $# -gt 0 ] || set -- resnet-50 resnet-101
mkdir -p "$dir"
for backbone in "$@"; do
    case $backbone in
        resnet-18) file=resnet18-f37072fd.pth ;;
        resnet-34) file=resnet34-b627a593.pth ;;
        resnet-50) file=resnet50-0676ba61.pth ;;
        resnet-101) file=resnet101-63fe2227.pth ;;
        *) echo "fetch-pretrained: unknown backbone '$backbone' (resnet-18, resnet-34, resnet-50, resnet-101)" >&2; exit 2 ;;
    esac
    # torchvision names its files <arch>-<first 8 hex digits of the SHA-256>: check it.
    want=${file##*-}
    want=${want%.pth}
    echo "fetch-pretrained: $backbone ← https://download.pytorch.org/models/$file" >&2
    curl -fsSL --retry 3 -o "$dir/$backbone.pth.part" "https://download.pytorch.org/models/$file"
    got=$(sha256sum "$dir/$backbone.pth.part" | cut -c1-8)
    [ "$got" = "$want" ] || { echo "fetch-pretrained: $file: SHA-256 starts $got, expected $want" >&2; exit 1; }
    mv "$dir/$backbone.pth.part" "$dir/$backbone.pth"
done
