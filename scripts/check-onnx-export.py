#!/usr/bin/env python3
"""Runs a model written by `semseg export` in ONNX Runtime and compares it with semseg's own answers.

Each CASE is RGB:HEIGHT:WIDTH:NPY: raw RGB bytes (HEIGHT x WIDTH x 3, as in a decoded image) and the float32
[C, H, W] probabilities `semseg predict --probabilities` wrote for the same image. For each case it prints one JSON
line: the largest probability difference, the relative L2 differences of the probabilities and of the logits
(each minus the pixel's top class, semseg's from the log of its probabilities), how many pixels of ONNX Runtime's `mask` agree
with the argmax of semseg's probabilities, how far a batch of two copies is from the single answer, and (for a file
exported with --probabilities) how far its probabilities are from the softmax of its logits.
Exits non-zero if the model cannot be loaded or run. Needs numpy and onnxruntime (pip install onnxruntime).

    scripts/check-onnx-export.py model.onnx img.rgb:47:61:img.npy [...]
"""
import argparse
import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("cases", nargs="+", metavar="RGB:HEIGHT:WIDTH:NPY")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if names not in (["logits", "mask"], ["logits", "mask", "probabilities"]):
        print(f"unexpected outputs {names}", file=sys.stderr)
        return 1
    with_probabilities = "probabilities" in names
    for case in args.cases:
        rgb, height, width, npy = case.split(":")
        height, width = int(height), int(width)
        pixels = np.fromfile(rgb, dtype=np.uint8).reshape(height, width, 3)
        image = pixels.transpose(2, 0, 1)[None].astype(np.float32)  # [1, 3, H, W], 0..255
        outputs = dict(zip(names, session.run(None, {"image": image})))
        logits, mask = outputs["logits"], outputs["mask"]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        softmax = shifted / shifted.sum(axis=1, keepdims=True)
        # The file's own softmax when it has one, else the softmax of its logits.
        probabilities = outputs.get("probabilities", softmax)
        want = np.load(npy)  # [C, H, W]
        got = probabilities[0]
        if got.shape != want.shape or mask.shape != (1, height, width) or mask.dtype != np.uint8:
            print(f"{case}: shapes {got.shape} {mask.shape} {mask.dtype}, semseg's {want.shape}", file=sys.stderr)
            return 1
        pair = session.run(["logits"], {"image": np.concatenate([image, image])})[0]
        batch_gap = max(float(np.abs(pair[i] - logits[0]).max()) for i in range(2))
        # semseg's logits up to a per-pixel constant, from its probabilities: each class's logit minus the top
        # class's, log(p / p_top), where p is large enough not to have lost digits. Compared with ONNX Runtime's
        # logits taken the same way, differences show even where the probabilities are close to uniform.
        top = want.argmax(axis=0)[None]
        kept = want > 1e-20
        semseg_gaps = np.log(np.maximum(want, 1e-38).astype(np.float64))
        semseg_gaps -= np.take_along_axis(semseg_gaps, top, axis=0)
        onnx_gaps = logits[0].astype(np.float64) - np.take_along_axis(logits[0].astype(np.float64), top, axis=0)
        scale = max(float(np.linalg.norm(semseg_gaps[kept])), 1e-30)
        logits_gap = float(np.linalg.norm((onnx_gaps - semseg_gaps)[kept])) / scale
        print(json.dumps({
            "case": rgb,
            "height": height,
            "width": width,
            "max_abs_diff": float(np.abs(got - want).max()),
            "relative_l2": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
            "logits_relative_l2": logits_gap,
            "mask_agreement": float((mask[0] == want.argmax(axis=0)).mean()),
            "mask_is_logits_argmax": bool((mask[0] == logits[0].argmax(axis=0)).all()),
            # How decisive the answer is: a near-uniform one would hide differences.
            "classes_in_mask": int(len(np.unique(mask[0]))),
            "mean_top_probability": float(want.max(axis=0).mean()),
            "batch_max_abs_diff": batch_gap,
            "has_probabilities": with_probabilities,
            "probabilities_vs_softmax": float(np.abs(probabilities - softmax).max()),
            "onnxruntime": ort.__version__,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
