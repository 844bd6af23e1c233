#!/usr/bin/env python3
"""Forward-pass images/s on CPU: resnet-serve's models (our CPU kernels, each
implementation asked for, and Candle's stock ops as the reference path) vs PyTorch
eager vs ONNX Runtime vs OpenVINO, interleaved per (model, batch) in one run on the same
threads, repeated --rounds times (median reported), and the ratio table for
BENCHMARKS.md.

    python scripts/bench_compare.py [--seconds 10] [--rounds 1] [--threads 2]
        [--models resnet18,...] [--batches 1,8,32] [--cpu-kernels auto,avx2] [--no-stock]

--cpu-kernels runs ours once per listed RESNET_SERVE_CPU_KERNELS value (auto, avx512,
avx2, gemm); a value the CPU cannot run fails the run. OpenVINO runs with
INFERENCE_PRECISION_HINT=f32, the latency hint and --threads inference threads.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time

import onnxruntime as ort
import openvino as ov
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


TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def candle(arch: str, batch: int, seconds: float, kernels: str | None = None,
           cpu_kernels: str | None = None) -> float:
    env = dict(os.environ)
    if kernels:
        env["RESNET_SERVE_KERNELS"] = kernels
    if cpu_kernels:
        env["RESNET_SERVE_CPU_KERNELS"] = cpu_kernels
    out = subprocess.run(
        [str(TARGET / "release/examples/forward_throughput"), arch, str(batch), str(seconds)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_s"]


def openvino_model(onnx_path: str, threads: int):
    core = ov.Core()
    return core.compile_model(core.read_model(onnx_path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
    })


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
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cpu-kernels", default="auto",
                   help="comma-separated RESNET_SERVE_CPU_KERNELS values to run ours with")
    p.add_argument("--no-stock", action="store_true", help="skip stock Candle (slow)")
    p.add_argument("--no-spin", action="store_true",
                   help="ONNX Runtime's threads block instead of spin-waiting (fairer on a "
                        "machine shared with other work; for PyTorch set OMP_WAIT_POLICY=PASSIVE)")
    args = p.parse_args()
    ours = args.cpu_kernels.split(",")
    subprocess.run(["cargo", "build", "--release", "--example", "forward_throughput"], cwd=ROOT, check=True)
    torch.set_num_threads(args.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    if args.no_spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    print(f"CPU: {cpu_model()}, threads {args.threads}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, openvino {ov.__version__}, {args.rounds} rounds x "
          f"{args.seconds} s, median, ORT spinning {'off' if args.no_spin else 'on'}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    engines = ["PyTorch", "ONNX Runtime", "OpenVINO"] + [f"ours {k}" for k in ours]
    if not args.no_stock:
        engines.append("stock Candle")
    header = ("| model | batch | " + " | ".join(f"{e} img/s" for e in engines) + " | "
              + " | ".join(f"ours {k}/ORT | ours {k}/OpenVINO" for k in ours) + " |")

    def line(arch, batch, r):
        ratios = " | ".join(f"{r[f'ours {k}'] / r['ONNX Runtime']:.2f} | "
                            f"{r[f'ours {k}'] / r['OpenVINO']:.2f}" for k in ours)
        return (f"| {arch} | {batch} | " + " | ".join(f"{r[e]:.2f}" for e in engines)
                + f" | {ratios} |")

    rows = []
    for arch in args.models.split(","):
        model = synthetic_model(arch)
        with tempfile.TemporaryDirectory() as d:
            onnx_path = os.path.join(d, "m.onnx")
            torch.onnx.export(model, synthetic_input(SEED, 1, 224), onnx_path, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
            sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            compiled = openvino_model(onnx_path, args.threads)
            request = compiled.create_infer_request()
            for batch in map(int, args.batches.split(",")):
                x = synthetic_input(SEED, batch, 224)
                xn = x.numpy()
                samples = {e: [] for e in engines}
                for _ in range(args.rounds):
                    with torch.inference_mode():
                        samples["PyTorch"].append(rate(lambda: model(x), batch, args.seconds))
                    samples["ONNX Runtime"].append(
                        rate(lambda: sess.run(None, {"x": xn}), batch, args.seconds))
                    samples["OpenVINO"].append(
                        rate(lambda: request.infer({0: xn}), batch, args.seconds))
                    for k in ours:
                        samples[f"ours {k}"].append(
                            candle(arch, batch, args.seconds, cpu_kernels=k))
                    if not args.no_stock:
                        samples["stock Candle"].append(
                            candle(arch, batch, args.seconds, "candle"))
                r = {e: statistics.median(v) for e, v in samples.items()}
                rows.append((arch, batch, r))
                print(line(arch, batch, r), flush=True)
    print()
    print(header)
    print("|---|---|" + "---|" * (len(engines) + 2 * len(ours)))
    for arch, batch, r in rows:
        print(line(arch, batch, r))


if __name__ == "__main__":
    main()
