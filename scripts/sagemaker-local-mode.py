#!/usr/bin/env python3
"""The SageMaker Python SDK (v2) as a real client of the two images, in local mode: no AWS account, no network.

Trains with the training image on a `semseg synth` dataset (file:// inputs and output path), deploys the resulting
model.tar.gz to a local endpoint with the inference image, sends a JPEG and checks that a PNG mask of the image's
size comes back. Then runs a Batch Transform job with the same model (`Transformer`, `accept="image/png"`,
`strategy="SingleRecord"`) over three JPEGs in WORK/transform-input and checks that WORK/transform-output holds a
`<name>.jpg.out` PNG mask of each image's size.

    pip install 'sagemaker>=2,<3'
    scripts/sagemaker-local-mode.py --train-image semseg-train --serve-image semseg-serve --semseg target/release/semseg

Local mode runs the containers with docker compose (or docker-compose) and serves on localhost:8080, which must be
free. A placeholder role and a region are set here; no credentials are needed. `transform(..., logs=False)`: with
logs the SDK looks for the job's CloudWatch logs, which local mode does not have.
"""
import argparse
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile

ROLE = "arn:aws:iam::111111111111:role/SageMakerRole"  # local mode never assumes it


def png_size(data: bytes):
    """(width, height) from a PNG's IHDR chunk, or None when `data` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def jpeg_size(data: bytes):
    """(width, height) from a baseline or progressive JPEG's SOF marker."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    raise ValueError("no SOF marker in the JPEG")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-image", default="semseg-train")
    parser.add_argument("--serve-image", default="semseg-serve")
    parser.add_argument("--semseg", default="target/release/semseg", help="semseg binary, to make the dataset")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--epochs", default="1")
    args = parser.parse_args()

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    import sagemaker
    from sagemaker.deserializers import BytesDeserializer
    from sagemaker.estimator import Estimator
    from sagemaker.local import LocalSession
    from sagemaker.model import Model
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import IdentitySerializer

    print(f"sagemaker {sagemaker.__version__}", flush=True)
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="semseg-local-mode-")).resolve()
    data = work / "data"
    subprocess.run(
        [args.semseg, "synth", "--out", str(data), "--seed", "11", "--train-count", "8", "--validation-count", "3",
         "--width", "64", "--height", "48"],
        check=True,
    )
    session = LocalSession()
    session.config = {"local": {"local_code": True}}
    # No usage telemetry: it would try to reach S3 after every call.
    session.sagemaker_config = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
    estimator = Estimator(
        image_uri=args.train_image,
        role=ROLE,
        instance_count=1,
        instance_type="local",
        output_path=f"file://{work / 'output'}",
        sagemaker_session=session,
        hyperparameters={
            "num_classes": 4, "num_training_samples": 8, "backbone": "resnet-18", "algorithm": "fcn",
            "use_pretrained_model": "False", "crop_size": 48, "base_size": 64, "epochs": args.epochs,
            "mini_batch_size": 4, "validation_mini_batch_size": 1, "learning_rate": 0.02,
        },
    )
    channels = ["train", "validation", "train_annotation", "validation_annotation"]
    estimator.fit({c: f"file://{data / c}" for c in channels})
    print(f"model data: {estimator.model_data}", flush=True)

    model = Model(
        image_uri=args.serve_image,
        model_data=estimator.model_data,
        role=ROLE,
        predictor_cls=Predictor,
        sagemaker_session=session,
    )
    predictor = model.deploy(
        initial_instance_count=1,
        instance_type="local",
        serializer=IdentitySerializer(content_type="image/jpeg"),
        deserializer=BytesDeserializer(accept="image/png"),
    )
    jpegs = sorted((data / "validation").glob("*.jpg"))
    try:
        jpeg = jpegs[0].read_bytes()
        mask = predictor.predict(jpeg)
        size = png_size(mask)
        expected = jpeg_size(jpeg)
        print(json.dumps({"image": jpegs[0].name, "png_bytes": len(mask), "png_size": size, "jpeg_size": expected}))
        if size != expected:
            sys.exit(f"expected a PNG mask of {expected}, got {size} ({len(mask)} bytes: {mask[:60]!r})")
    finally:
        # Also frees localhost:8080 for the transform job's container.
        predictor.delete_endpoint()
    print("sagemaker local mode: trained, deployed and predicted a PNG mask", flush=True)

    batch_transform(model, jpegs[:3], work)
    print("sagemaker local mode: batch transform wrote a PNG mask of each image", flush=True)


def batch_transform(model, jpegs, work):
    """Batch Transform of `jpegs` with `model`, one request per file; checks each `<name>.out` is a PNG of its size."""
    inputs, outputs = work / "transform-input", work / "transform-output"
    inputs.mkdir(parents=True, exist_ok=True)
    for jpeg in jpegs:
        shutil.copy(jpeg, inputs / jpeg.name)
    transformer = model.transformer(
        instance_count=1,
        instance_type="local",
        strategy="SingleRecord",
        accept="image/png",
        output_path=f"file://{outputs}",
    )
    transformer.transform(f"file://{inputs}", content_type="image/jpeg", split_type=None, logs=False)
    for jpeg in jpegs:
        out = outputs / f"{jpeg.name}.out"
        if not out.is_file():
            sys.exit(f"no {out.name} in {outputs}: {sorted(p.name for p in outputs.glob('*'))}")
        mask = out.read_bytes()
        size, expected = png_size(mask), jpeg_size(jpeg.read_bytes())
        print(json.dumps({"transformed": jpeg.name, "png_bytes": len(mask), "png_size": size, "jpeg_size": expected}))
        if size != expected:
            sys.exit(f"{out.name}: expected a PNG mask of {expected}, got {size} ({len(mask)} bytes: {mask[:60]!r})")


if __name__ == "__main__":
    main()
