#!/usr/bin/env python3
"""Forward-pass images/s on CPU: resnet-serve's models (our CPU kernels, and Candle's
stock ops as the reference path) vs PyTorch eager vs ONNX Runtime, interleaved per
(model, batch) in one run on the same threads, and the ratio table for BENCHMARKS.md.

    python scripts/bench_compare.py [--seconds 10] [--threads 2] [--models resnet18,...]
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import tempfile
import time

import onnxruntime as ort
import torch

from make_fixtures import SEED, synthetic_input, synthetic_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


def rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        fn()
        runs += 1
    return runs * batch / (time.perf_counter() - start)


def candle(arch: str, batch: int, seconds: float, kernels: str | None = None) -> float:
    env = dict(os.environ)
    if kernels:
        env["RESNET_SERVE_KERNELS"] = kernels
    out = subprocess.run(
        [str(ROOT / "target/release/examples/forward_throughput"), arch, str(batch), str(seconds)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_s"]


def cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--models", default="resnet18,resnet50,resnext50_32x4d")
    p.add_argument("--batches", default="1,8,32")
    args = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "--example", "forward_throughput"], cwd=ROOT, check=True)
    torch.set_num_threads(args.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    print(f"CPU: {cpu_model()}, threads {args.threads}, torch {torch.__version__}, onnxruntime {ort.__version__}")
    rows = []
    for arch in args.models.split(","):
        model = synthetic_model(arch)
        with tempfile.TemporaryDirectory() as d:
            onnx_path = os.path.join(d, "m.onnx")
            torch.onnx.export(model, synthetic_input(SEED, 1, 224), onnx_path, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
            sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            for batch in map(int, args.batches.split(",")):
                x = synthetic_input(SEED, batch, 224)
                xn = x.numpy()
                with torch.inference_mode():
                    pt = rate(lambda: model(x), batch, args.seconds)
                ox = rate(lambda: sess.run(None, {"x": xn}), batch, args.seconds)
                cd = candle(arch, batch, args.seconds)
                st = candle(arch, batch, args.seconds, "candle")
                rows.append((arch, batch, pt, ox, cd, st))
                print(f"| {arch} | {batch} | {pt:.2f} | {ox:.2f} | {st:.2f} | {cd:.2f} | {cd / pt:.2f} | {cd / ox:.2f} |", flush=True)
    print()
    print("| model | batch | PyTorch img/s | ONNX Runtime img/s | stock Candle img/s | ours img/s | ours/PyTorch | ours/ORT |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, batch, pt, ox, cd, st in rows:
        print(f"| {arch} | {batch} | {pt:.2f} | {ox:.2f} | {st:.2f} | {cd:.2f} | {cd / pt:.2f} | {cd / ox:.2f} |")


if __name__ == "__main__":
    main()
