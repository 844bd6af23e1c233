#!/usr/bin/env python3
"""GPU checks for one `device` call (benches/gpu/run.sh runs this): parity of the CUDA
build against PyTorch on the same generated weights, forward images/s against PyTorch
eager f16 channels_last on the same card in the same run, and the server end-to-end
with the bundled load client. Every step writes into OUT/results.json as it finishes, so
a run cut short still reports what it measured.

Rehearse on CPU (no GPU needed; small sizes):
    python benches/gpu/gpu_bench.py --bin target/release/resnet-serve \
        --client target/release/resnet-client --overhead target/release/examples/server_overhead \
        --device cpu --out /tmp/gpu-rehearsal --quick
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from make_fixtures import SEED, synthetic_input, synthetic_model  # noqa: E402

RESULTS: dict = {}


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def save(out: pathlib.Path) -> None:
    (out / "results.json").write_text(json.dumps(RESULTS, indent=1))


def run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def environment(args) -> None:
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if args.device != "cpu":
        env["gpu"] = torch.cuda.get_device_name(0)
        smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                   "--format=csv,noheader"], 30)
        env["nvidia_smi"] = smi.stdout.strip()
    v = run([args.bin, "--version"], 30)
    env["resnet_serve"] = (v.stdout + v.stderr).strip()
    RESULTS["environment"] = env
    log("environment", json.dumps(env))


def torch_device(args) -> torch.device:
    return torch.device("cpu" if args.device == "cpu" else "cuda:0")


def parity(args, out: pathlib.Path) -> None:
    """f32 (TF32 off) within rel 1e-4 of PyTorch float64; f16/bf16 top-1 against it."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch_device(args)
    rows = []
    # (dtype, kernels, CUDA graphs): on a GPU `bench logits` replays a captured graph
    # unless RESNET_SERVE_CUDA_GRAPHS=0.
    configs = [("f32", "auto", True)]
    if args.stock_max_batch > 0:
        configs.append(("f32", "candle", False))
    if args.device != "cpu":
        configs += [("f16", "auto", True), ("f16", "auto", False), ("bf16", "auto", True)]
        if args.stock_max_batch > 0:
            configs.append(("f16", "candle", False))
    for arch in args.parity_archs:
        model = synthetic_model(arch)
        x = synthetic_input(SEED, args.parity_batch, 224)
        with torch.inference_mode():
            ref = model.double().to(dev)(x.double().to(dev)).cpu().numpy()
            half = model.half().to(memory_format=torch.channels_last) if args.device != "cpu" else None
            torch_f16 = (half(x.to(dev).half().to(memory_format=torch.channels_last)).float().cpu().numpy()
                         if half is not None else None)
        del model
        scale = float(np.abs(ref).max())
        top1 = ref.argmax(1)
        margin = np.sort(ref, 1)
        gap = margin[:, -1] - margin[:, -2]
        # Inputs whose top-2 gap in the float64 reference exceeds 1% of the logit range:
        # half precision cannot be expected to order near-ties (PyTorch's own f16 does not).
        decidable = gap > 0.01 * scale
        base = {"model": arch, "batch": args.parity_batch,
                "ref_top1_distinct": int(len(set(top1.tolist()))),
                "ref_min_top2_margin": float(gap.min()),
                "decidable_inputs": int(decidable.sum())}

        def agreement(logits: np.ndarray) -> tuple[float, float | None]:
            same = logits.argmax(1) == top1
            return float(same.mean()), (float(same[decidable].mean()) if decidable.any() else None)

        if torch_f16 is not None:
            a, d = agreement(torch_f16)
            rows.append({**base, "engine": "pytorch", "dtype": "f16",
                         "rel_err": float(np.abs(torch_f16 - ref).max() / scale),
                         "top1_agree": a, "top1_agree_decidable": d})
        for dtype, kernels, graphs in configs:
            with tempfile.NamedTemporaryFile(suffix=".f32") as f:
                cmd = [args.bin, "bench", "logits", "--model", arch, "--batch", str(args.parity_batch),
                       "--seed", str(SEED), "--device", args.device_arg, "--dtype", dtype,
                       "--kernels", kernels, "--out", f.name]
                t0 = time.time()
                try:
                    p = run(cmd, 300, {"RESNET_SERVE_CUDA_GRAPHS": "1" if graphs else "0"})
                except subprocess.TimeoutExpired:
                    rows.append({**base, "engine": "resnet-serve", "dtype": dtype, "kernels": kernels,
                                 "graphs": graphs, "error": "timeout"})
                    continue
                if p.returncode != 0:
                    rows.append({**base, "engine": "resnet-serve", "dtype": dtype, "kernels": kernels,
                                 "graphs": graphs, "error": p.stderr.strip()[-2000:]})
                    log("parity FAILED", arch, dtype, kernels, p.stderr.strip()[-500:])
                    continue
                ours = np.fromfile(f.name, dtype="<f4").reshape(args.parity_batch, 1000)
            rel = float(np.abs(ours - ref).max() / scale)
            agree, agree_d = agreement(ours)
            ok = rel <= 1e-4 if dtype == "f32" else (agree_d if agree_d is not None else agree) >= 0.99
            warned = [line for line in p.stderr.splitlines() if "CUDA graph" in line]
            rows.append({**base, "engine": "resnet-serve", "dtype": dtype, "kernels": kernels,
                         "graphs": graphs, "graph_warnings": warned[-3:],
                         "rel_err": rel, "top1_agree": agree,
                         "top1_agree_decidable": agree_d, "pass": ok,
                         "seconds": round(time.time() - t0, 2)})
            log(f"parity {arch} {dtype} {kernels} graphs={graphs}: rel {rel:.2e} top1 {agree:.3f} "
                f"(decidable {agree_d}) {'ok' if ok else 'FAIL'} {' | '.join(warned[-1:])}")
        RESULTS["parity"] = rows
        save(out)


def torch_rate(model, batch: int, seconds: float, dev: torch.device, dtype: torch.dtype) -> float:
    x = torch.randn(batch, 3, 224, 224, device=dev, dtype=dtype)
    if dev.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        sync()
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < seconds:
            model(x)
            runs += 1
            if runs % 8 == 0:
                sync()
        sync()
        return runs * batch / (time.perf_counter() - start)


def ours_rate(args, arch: str, batch: int, dtype: str, kernels: str) -> dict:
    cmd = [args.bin, "bench", "forward", "--model", arch, "--batch", str(batch), "--seed", str(SEED),
           "--device", args.device_arg, "--dtype", dtype, "--kernels", kernels,
           "--seconds", str(args.seconds)]
    env = {"RESNET_SERVE_CUDNN_PROFILE": "1"}
    try:
        p = run(cmd, 120, env)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-1500:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    profile = [line for line in p.stderr.splitlines() if "cudnn profile" in line]
    if profile:
        out["profile"] = profile[-1]
    warnings = [line for line in p.stderr.splitlines() if "WARN" in line or "CUDA graph" in line]
    if warnings:
        out["warnings"] = warnings[-3:]
    return out


def throughput(args, out: pathlib.Path) -> None:
    """Interleaved per (model, batch): PyTorch eager, ours (fastest kernels), ours (stock)."""
    dev = torch_device(args)
    gpu = args.device != "cpu"
    dtype = "f16" if gpu else "f32"
    tdtype = torch.float16 if gpu else torch.float32
    rows = []
    for arch in args.bench_archs:
        model = synthetic_model(arch).to(dev).to(tdtype)
        if gpu:
            model = model.to(memory_format=torch.channels_last)
        for batch in args.batches:
            row = {"model": arch, "batch": batch, "dtype": dtype}
            try:
                row["pytorch"] = torch_rate(model, batch, args.seconds, dev, tdtype)
            except RuntimeError as e:  # out of memory, say
                row["pytorch_error"] = str(e)[:500]
            fast = ours_rate(args, arch, batch, dtype, "auto")
            row["ours"] = fast.get("images_per_s")
            row["ours_eager"] = fast.get("images_per_s_eager")
            row["ours_cuda_graph"] = fast.get("cuda_graph")
            row["ours_with_copies"] = fast.get("images_per_s_with_copies")
            row["ours_with_copies_2_threads"] = fast.get("images_per_s_with_copies_2_threads")
            if fast.get("warnings"):
                row["ours_warnings"] = fast["warnings"]
            row["ours_kernels"] = fast.get("kernels")
            if "profile" in fast:
                row["ours_profile"] = fast["profile"]
            if "error" in fast:
                row["ours_error"] = fast["error"]
            if batch <= args.stock_max_batch:
                stock = ours_rate(args, arch, batch, dtype, "candle")
                row["stock_candle"] = stock.get("images_per_s")
                if "error" in stock:
                    row["stock_error"] = stock["error"]
            if row.get("pytorch") and row.get("ours"):
                row["ratio_vs_pytorch"] = row["ours"] / row["pytorch"]
            log("throughput", json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                          for k, v in row.items() if not k.endswith("error")}))
            for k in [k for k in row if k.endswith("_error")]:
                log("  ", k, row[k][-400:])
            rows.append(row)
            RESULTS["throughput"] = rows
            save(out)
        del model
        if gpu:
            torch.cuda.empty_cache()


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread group of process `pid` (names without their
    trailing numbers), from /proc: where a loaded server's time goes."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")].rstrip("0123456789-")
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_ready(log_path: pathlib.Path, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if "ready" in log_path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def server(args, out: pathlib.Path, sync: str = "block") -> None:
    """The real server and `resnet-client load` on this machine, tensor inputs. `sync`
    is how its GPU workers wait for a replay (RESNET_SERVE_CUDA_SYNC): results go under
    "server" for the default (block), "server_spin" for spin."""
    key = "server" if sync == "block" else f"server_{sync}"
    gpu = args.device != "cpu"
    dtype = "f16" if gpu else "f32"
    arch = "resnet50"
    work = pathlib.Path(tempfile.mkdtemp())
    weights = work / "synthetic_resnet50.pth"
    torch.save(synthetic_model(arch).state_dict(), weights)
    batch = args.server_batch
    sizes = sorted({1, 8, 16, 32, batch})
    server_log = out / f"{key}.log"
    cmd = [args.bin, "--model", f"resnet50_swsl={weights}", "--device", args.device_arg,
           "--dtype", dtype, "--batch-sizes", ",".join(map(str, sizes)), "--max-queue-delay-ms", "2",
           "--queue-capacity", str(max(1024, 8 * batch)), "--listen", "127.0.0.1:50151",
           "--metrics-listen", "127.0.0.1:9191"]
    if args.shared_memory:
        cmd += ["--shared-memory", "true"]  # off unless enabled; the shm rows register regions
    t0 = time.time()
    with open(server_log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "RESNET_SERVE_CUDA_SYNC": sync})
    rows = []
    try:
        if not wait_ready(server_log, proc, 180):
            RESULTS[key] = {"error": "server did not become ready",
                                 "log": server_log.read_text(errors="replace")[-3000:]}
            save(out)
            return
        startup = time.time() - t0
        log(f"server ready in {startup:.1f} s (load + warm-up of sizes {sizes})")
        # The in-process rate does not depend on how the server waits: measured once.
        inproc = (RESULTS.get("server") or {}).get("in_process") if key != "server" else None
        inproc = inproc or ours_rate(args, arch, batch, dtype, "auto")
        # The last row asks for a model the server does not have: each request is received
        # and decoded in full, then refused, so it times the transport alone (the ceiling
        # the server's end-to-end rate can reach on this machine).
        # Then the same loads with the tensors in system shared memory (a client on this
        # host sends references, not bytes): what the server costs without the transport.
        transport_row = max(args.load_rows, key=lambda r: (r[1], r[0]))
        loads = ([(c, n, "tcp") for c, n in args.load_rows] + [(*transport_row, "transport")]
                 + [(c, n, "shm") for c, n in args.load_rows if args.shared_memory])
        for concurrency, per_request, kind in loads:
            transport_only = kind == "transport"
            cmd = [args.client, "--endpoint", "http://127.0.0.1:50151", "load",
                   "--concurrency", str(concurrency), "--images-per-request", str(per_request),
                   "--connections", str(min(concurrency, args.connections)),
                   "--duration", str(args.load_seconds), "--warmup", "2", "--synthetic", "--json",
                   "--metrics", "127.0.0.1:9191"]
            if transport_only:
                cmd += ["--model", "no-such-model"]
            if kind == "shm":
                cmd += ["--shared-memory"]
            cpu_before, client_before, t_before = thread_cpu(proc.pid), children_cpu(), time.time()
            try:
                p = run(cmd, args.load_seconds + 90)
            except subprocess.TimeoutExpired:
                rows.append({"concurrency": concurrency, "images_per_request": per_request,
                             "error": "timeout"})
                continue
            wall = time.time() - t_before
            cpu_after = thread_cpu(proc.pid)
            # Cores busy on average over the whole load (warm-up included), per thread group.
            server_cores = {k: round((v - cpu_before.get(k, 0.0)) / wall, 2)
                            for k, v in cpu_after.items() if v - cpu_before.get(k, 0.0) > 0.01 * wall}
            client_cores = round((children_cpu() - client_before) / wall, 2)
            if p.returncode != 0:
                rows.append({"concurrency": concurrency, "images_per_request": per_request,
                             "error": (p.stdout + p.stderr)[-1500:]})
                continue
            report = json.loads(p.stdout)
            report["concurrency"] = concurrency
            report["images_per_request"] = per_request
            report["shared_memory"] = kind == "shm"
            report["server_cores"] = server_cores
            report["client_cores"] = client_cores
            if transport_only:
                report["transport_only"] = True
                report["images_per_s"] = report["requests"] * per_request / report["duration_s"]
            # What the server spends per image (all its threads, worker and staging
            # included): cores busy divided by images per second.
            report["server_cpu_us_per_image"] = round(
                1e6 * sum(server_cores.values()) / max(report["images_per_s"], 1e-9), 1)
            # The target: end to end against in process at the same batch size
            # (with copies, as the server runs it, where the device has them).
            base = inproc.get("images_per_s_with_copies") or inproc.get("images_per_s")
            if base and not transport_only:
                report["vs_in_process"] = report["images_per_s"] / base
            rows.append(report)
            note = {"tcp": "", "transport": " (transport only)", "shm": " (shared memory)"}[kind]
            ratio = report.get("vs_in_process")
            versus = f"{ratio:.2f}x in process, " if ratio else ""
            log(f"{key} load c={concurrency} x{per_request}{note}: "
                f"{report['images_per_s']:.0f} img/s, {versus}"
                f"p50 {report['latency_ms']['p50']:.1f} ms p99 {report['latency_ms']['p99']:.1f} ms, "
                f"errors {report['errors']}; server ms: request "
                f"{(report.get('server') or {}).get('mean_request_ms', 0):.1f}, queue "
                f"{(report.get('server') or {}).get('mean_queue_ms', 0):.1f}, compute/batch "
                f"{(report.get('server') or {}).get('mean_compute_ms', 0):.1f}; "
                f"cores: client {client_cores}, server {server_cores} "
                f"({report['server_cpu_us_per_image']:.0f} µs of server CPU per image)")
            RESULTS[key] = {"startup_s": startup, "batch_sizes": sizes, "dtype": dtype,
                            "sync": sync, "in_process": inproc, "rows": rows}
            save(out)
        RESULTS[key] = {"startup_s": startup, "batch_sizes": sizes, "dtype": dtype,
                        "sync": sync, "in_process": inproc, "rows": rows}
        save(out)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def overhead(args, out: pathlib.Path) -> None:
    """The serving path's ceiling on this machine: examples/server_overhead (the real
    server and load client, a model that costs a fixed time per batch and computes
    nothing) at the server step's loads. Then the same loads with `--one-device`: the
    workers take turns on one emulated device that holds a batch for the GPU's own time
    (the resident graph's), each staging its batch first, and each row's ratio to that
    model called in process: the target's ratio with the device emulated, to set beside
    the real one."""
    if not args.overhead or not pathlib.Path(args.overhead).exists():
        RESULTS["overhead"] = {"error": f"no server_overhead binary at {args.overhead}"}
        return
    # The device time of one batch of the server step's largest size, from the
    # in-process measurement when there is one.
    inproc = (RESULTS.get("server") or {}).get("in_process") or {}
    rate = inproc.get("images_per_s_with_copies")
    batch_ms = 1000.0 * args.server_batch / rate if rate else 2.0
    cmd = [args.overhead, "--batch-ms", f"{batch_ms:.3f}", "--seconds", str(args.load_seconds),
           "--connections", str(args.connections),
           # Up to the server step's batch, the size the in-process figures are taken at.
           "--batch-sizes", ",".join(map(str, sorted(
               {s for s in (1, 8, 16, 32) if s < args.server_batch} | {args.server_batch})))]
    cmd += [f"{c}x{n}" for c, n in args.load_rows]
    resident = inproc.get("images_per_s")
    device_ms = 1000.0 * args.server_batch / resident if resident else batch_ms / 2
    transports = ([], ["--shared-memory"]) if args.shared_memory else ([],)
    passes = [t for t in transports] + [
        t + ["--one-device", "--batch-ms", f"{device_ms:.3f}"] for t in transports]
    rows, in_process, stderr = [], [], ""
    for extra in passes:
        try:
            p = run(cmd + extra, 90 + 15 * len(args.load_rows) * args.load_seconds)
        except subprocess.TimeoutExpired:
            RESULTS["overhead"] = {"error": "timeout", "rows": rows}
            return
        stderr += p.stderr[-1500:] if p.returncode else ""
        for line in p.stdout.splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            (in_process if r.get("in_process") else rows).append(r)
    for r in in_process:
        log(f"emulated device in process, batch {r['batch']} ({r['batch_ms']:.2f} ms per batch): "
            f"{r['images_per_s']:.0f} img/s")
    for r in rows:
        ratio = r.get("vs_in_process")
        log(f"ceiling c={r['concurrency']} x{r['images_per_request']} ({r['batch_ms']:.2f} ms per batch"
            f"{', one device' if r.get('one_device') else ''}): "
            f"{r['images_per_s']:.0f} img/s{f', {ratio:.2f}x in process' if ratio else ''}, "
            f"p50 {r['latency_ms']['p50']:.1f} ms, errors {r['errors']}, "
            f"{r.get('server_cpu_us_per_image', 0):.0f} µs of server CPU per image"
            f"{' (shared memory)' if r.get('shared_memory') else ''}")
    RESULTS["overhead"] = {"batch_ms": batch_ms, "device_ms": device_ms, "rows": rows,
                           "in_process": in_process, "stderr": stderr}
    save(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", required=True)
    p.add_argument("--client", required=True)
    p.add_argument("--overhead", help="examples/server_overhead binary (the serving path's ceiling)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="CPU rehearsal sizes")
    p.add_argument("--steps", default="parity,throughput,server,overhead",
                   help="of parity, throughput, server, server_spin (the server with its "
                        "GPU workers spinning while they wait), overhead")
    p.add_argument("--parity-archs")
    p.add_argument("--bench-archs")
    p.add_argument("--batches")
    p.add_argument("--stock-max-batch", type=int)
    p.add_argument("--load-rows", help="CONCURRENCYxIMAGES,... e.g. 4x64,16x16")
    p.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                   help="skip the load rows with tensors in system shared memory")
    args = p.parse_args()
    args.device_arg = "cuda:0" if args.device == "cuda" else "cpu"
    if args.quick:
        args.parity_archs, args.parity_batch = ["resnet18"], 4
        args.bench_archs, args.batches, args.seconds = ["resnet18"], [1, 4], 1.0
        args.stock_max_batch = 4
        args.server_batch, args.load_rows, args.load_seconds = 4, [(2, 2)], 4
        args.connections = 2
    else:
        args.parity_archs, args.parity_batch = ["resnet50", "resnext101_32x8d"], 64
        args.bench_archs, args.batches, args.seconds = ["resnet50", "resnext101_32x8d"], [1, 8, 64, 256], 1.5
        args.stock_max_batch = 64
        args.server_batch = 64
        args.load_rows, args.load_seconds = [(4, 64), (8, 64), (16, 16), (64, 1)], 6
        args.connections = 16
    cli = p.parse_args()
    if cli.parity_archs:
        args.parity_archs = cli.parity_archs.split(",")
    if cli.bench_archs:
        args.bench_archs = cli.bench_archs.split(",")
    if cli.batches:
        args.batches = [int(b) for b in cli.batches.split(",")]
    if cli.stock_max_batch is not None:
        args.stock_max_batch = cli.stock_max_batch
    if cli.load_rows:
        args.load_rows = [tuple(int(v) for v in r.split("x")) for r in cli.load_rows.split(",")]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    environment(args)
    save(out)
    steps = {"parity": parity, "throughput": throughput, "server": server,
             "server_spin": lambda a, o: server(a, o, "spin"), "overhead": overhead}
    for name in args.steps.split(","):
        t0 = time.time()
        try:
            steps[name](args, out)
        except Exception as e:  # one step failing must not lose the others
            RESULTS.setdefault("failures", []).append(f"{name}: {type(e).__name__}: {e}")
            log("step", name, "failed:", repr(e))
        RESULTS.setdefault("step_seconds", {})[name] = round(time.time() - t0, 1)
        save(out)
    log("done", json.dumps(RESULTS.get("step_seconds")))


if __name__ == "__main__":
    main()
