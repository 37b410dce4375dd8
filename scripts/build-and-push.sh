#!/usr/bin/env bash
# Builds the semseg images and pushes them to Amazon ECR as a bring-your-own algorithm, then prints the image URIs
# to use in CreateTrainingJob (AlgorithmSpecification.TrainingImage) and CreateModel (PrimaryContainer.Image), or
# as image_uri in the SageMaker Python SDK.
#
#   scripts/build-and-push.sh [train|serve|all]      (default all)
#
# Environment: AWS_REGION (default: the AWS CLI's configured region), AWS_ACCOUNT_ID (default: from STS),
# REPOSITORY_PREFIX (default semseg → repositories semseg-train and semseg-serve, created when missing),
# TAG (default: git describe), TRAIN_BUILD_ARGS / SERVE_BUILD_ARGS (extra `docker build` flags, e.g.
# TRAIN_BUILD_ARGS="--build-arg CUDA_VERSION=13.0.1 --build-arg UBUNTU=ubuntu24.04 --build-arg CUDA_COMPUTE_CAP=75").
# Needs docker and the AWS CLI v2 with credentials allowed to push to ECR.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
case $which in train | serve | all) ;; *) echo "usage: build-and-push.sh [train|serve|all]" >&2; exit 2 ;; esac
for tool in docker aws; do
    command -v "$tool" >/dev/null || { echo "build-and-push: '$tool' is not installed" >&2; exit 1; }
done

region=${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region || true)}}
[ -n "$region" ] || { echo "build-and-push: set AWS_REGION (no region configured for the AWS CLI)" >&2; exit 1; }
account=${AWS_ACCOUNT_ID:-$(aws sts get-caller-identity --query Account --output text)}
prefix=${REPOSITORY_PREFIX:-semseg}
tag=${TAG:-$(git describe --tags --always --dirty 2>/dev/null || echo latest)}
registry=$account.dkr.ecr.$region.amazonaws.com
# ECR in the China regions lives under amazonaws.com.cn.
case $region in cn-*) registry=$registry.cn ;; esac

aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$registry"

push() { # push train|serve
    local kind=$1 repo=$prefix-$1 uri extra
    uri=$registry/$repo:$tag
    if [ "$kind" = train ]; then extra=${TRAIN_BUILD_ARGS:-}; else extra=${SERVE_BUILD_ARGS:-}; fi
    aws ecr describe-repositories --region "$region" --repository-names "$repo" >/dev/null 2>&1 ||
        aws ecr create-repository --region "$region" --repository-name "$repo" >&2
    # shellcheck disable=SC2086 # the extra flags are meant to split
    docker build -f "Dockerfile.$kind" $extra -t "$repo:$tag" -t "$uri" . >&2
    docker push "$uri" >&2
    echo "$uri"
}

train_uri= serve_uri=
if [ "$which" != serve ]; then train_uri=$(push train | tail -n 1); fi
if [ "$which" != train ]; then serve_uri=$(push serve | tail -n 1); fi
echo
[ -z "$train_uri" ] || echo "training image (CreateTrainingJob AlgorithmSpecification.TrainingImage): $train_uri"
[ -z "$serve_uri" ] || echo "inference image (CreateModel PrimaryContainer.Image):                   $serve_uri"
