#!/usr/bin/env python3
"""Drives a running resnet-serve through Python's tritonclient[grpc], as a Triton user
would; run by tests/kserve.rs (`tritonclient_drives_the_server`), which starts the server
and writes the reference logits (from resnet-serve's own API) into --data.

Exits 0 and prints "all tritonclient checks passed", or exits 1 naming the failed check.
"""

import argparse
import os
import pathlib
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def system_shared_memory(c, m, x, want):
    """Triton's system shared-memory extension, through tritonclient's own helpers: the
    input read from one region, the logits written into another, errors for bad windows."""
    key = f"/resnet-serve-tritonclient-{os.getpid()}"
    out_key = key + "-out"
    in_handle = shm.create_shared_memory_region("in", key, x.nbytes + 64)
    out_handle = shm.create_shared_memory_region("out", out_key, 2 * 1000 * 4)
    try:
        # The tensors 64 bytes into the object, so offsets are exercised too.
        shm.set_shared_memory_region(in_handle, [x], offset=64)
        c.register_system_shared_memory("in", key, x.nbytes + 64)
        c.register_system_shared_memory("out", out_key, 2 * 1000 * 4)
        st = c.get_system_shared_memory_status(as_json=True)["regions"]
        check(set(st) == {"in", "out"} and int(st["in"]["byte_size"]) == x.nbytes + 64,
              f"shared memory status {st}")
        inp = grpcclient.InferInput("input", [2, 3, 224, 224], "FP32")
        inp.set_shared_memory("in", x.nbytes, offset=64)
        out = grpcclient.InferRequestedOutput("logits")
        out.set_shared_memory("out", 2 * 1000 * 4)
        r = c.infer(m, [inp], outputs=[out, grpcclient.InferRequestedOutput("probabilities")])
        o = r.get_output("logits")
        check(o is not None and o.parameters["shared_memory_region"].string_param == "out",
              "logits output placed in shared memory")
        got = shm.get_contents_as_numpy(out_handle, np.float32, [2, 1000])
        check(rel(got, want) <= 1e-5, f"shared-memory logits match Classify (rel {rel(got, want):.2e})")
        probs = r.as_numpy("probabilities")
        check(probs.shape == (2, 1000) and np.allclose(probs.sum(1), 1, atol=1e-4),
              "an output not in shared memory still comes in the response")
        # A window past the region, an unknown region, a name already taken.
        past = grpcclient.InferInput("input", [2, 3, 224, 224], "FP32")
        past.set_shared_memory("in", x.nbytes, offset=128)
        nowhere = grpcclient.InferInput("input", [2, 3, 224, 224], "FP32")
        nowhere.set_shared_memory("nowhere", x.nbytes)
        for what, inputs, code in [("past its region", [past], "INVALID_ARGUMENT"),
                                   ("unknown region", [nowhere], "NOT_FOUND")]:
            try:
                c.infer(m, inputs)
                check(False, f"{what} must fail")
            except InferenceServerException as e:
                check(code in str(e.status()), f"{code} for a window {what}: {e.message()[:90]}")
        small = grpcclient.InferRequestedOutput("logits")
        small.set_shared_memory("out", 1000 * 4)
        try:
            c.infer(m, [inp], outputs=[small])
            check(False, "an output window too small must fail")
        except InferenceServerException as e:
            check("INVALID_ARGUMENT" in str(e.status()) and "needs 8000 bytes" in e.message(),
                  f"INVALID_ARGUMENT for an output window too small: {e.message()[:90]}")
        try:
            c.register_system_shared_memory("in", key, 64)
            check(False, "registering a name twice must fail")
        except InferenceServerException as e:
            check("ALREADY_EXISTS" in str(e.status()), f"ALREADY_EXISTS: {e.message()[:80]}")
        # A key that is a symbolic link is refused, never followed.
        link = key + "-link"
        os.symlink(f"/dev/shm{key}", f"/dev/shm{link}")
        try:
            c.register_system_shared_memory("link", link, 64)
            check(False, "a symbolic link must be refused")
        except InferenceServerException as e:
            check("INVALID_ARGUMENT" in str(e.status()) and "symbolic link" in e.message(),
                  f"INVALID_ARGUMENT for a symbolic link: {e.message()[:90]}")
        finally:
            os.unlink(f"/dev/shm{link}")
        # The client truncates its object under a registered region: that call fails,
        # the server goes on.
        os.truncate(f"/dev/shm{key}", 0)
        try:
            c.infer(m, [inp])
            check(False, "an input in a truncated object must fail")
        except InferenceServerException as e:
            check("FAILED_PRECONDITION" in str(e.status()) and "shrank" in e.message(),
                  f"FAILED_PRECONDITION for a truncated object: {e.message()[:90]}")
        check(c.is_server_live(), "the server lives on after a truncated object")
        c.unregister_system_shared_memory()
        check(c.get_system_shared_memory_status(as_json=True).get("regions", {}) == {},
              "every region unregistered")
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=pathlib.Path)
    p.add_argument("--jpeg", required=True, type=pathlib.Path)
    a = p.parse_args()
    m = a.model
    x = np.fromfile(a.data / "input.f32", dtype="<f4").reshape(2, 3, 224, 224)
    want = np.fromfile(a.data / "logits.f32", dtype="<f4").reshape(2, 1000)
    jpeg_want = np.fromfile(a.data / "jpeg_logits.f32", dtype="<f4").reshape(1, 1000)

    c = grpcclient.InferenceServerClient(url=a.url)
    check(c.is_server_live(), "server live")
    check(c.is_server_ready(), "server ready")
    check(c.is_model_ready(m), "model ready")
    check(not c.is_model_ready("resnet50_swsl"), "an unloaded model is not ready")
    meta = c.get_server_metadata(as_json=True)
    check({"classification", "model_configuration", "statistics", "schedule_policy",
           "system_shared_memory"} <= set(meta["extensions"]), f"server extensions {meta['extensions']}")
    mm = c.get_model_metadata(m, as_json=True)
    check(mm["inputs"][0]["name"] == "input" and mm["inputs"][0]["datatype"] == "FP32"
          and [int(d) for d in mm["inputs"][0]["shape"]] == [-1, 3, 224, 224], f"input metadata {mm['inputs']}")
    check([o["name"] for o in mm["outputs"]] == ["logits"], "one output listed: the logits")
    cfg = c.get_model_config(m, as_json=True)["config"]
    check(int(cfg["max_batch_size"]) > 0 and "dynamic_batching" in cfg, "model config with dynamic batching")
    check([int(d) for d in cfg["input"][0]["dims"]] == [3, 224, 224], "config input dims")
    check(cfg["input"][0]["format"] == "FORMAT_NCHW", "config input format NCHW")
    check([o["name"] for o in cfg["output"]] == ["logits"], "one output configured: the logits")

    # FP32 raw input: the logits our own API gives for the same tensor.
    inp = grpcclient.InferInput("input", [2, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(x)
    r = c.infer(m, [inp], outputs=[grpcclient.InferRequestedOutput("logits"),
                                   grpcclient.InferRequestedOutput("probabilities")])
    logits = r.as_numpy("logits")
    check(logits.shape == (2, 1000) and rel(logits, want) <= 1e-5, f"FP32 logits match Classify (rel {rel(logits, want):.2e})")
    probs = r.as_numpy("probabilities")
    check(np.allclose(probs.sum(1), 1, atol=1e-4), "probabilities sum to 1")

    # Classification extension.
    r = c.infer(m, [inp], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    top = r.as_numpy("logits")
    check(top.shape == (2, 3), f"classification shape {top.shape}")
    score, index, label = top[0][0].decode().split(":", 2)
    check(int(index) == int(want[0].argmax()) and abs(float(score) - want[0].max()) < 1e-4 and label,
          f"classification entry {top[0][0]!r}")

    # BYTES encoded images.
    img = grpcclient.InferInput("image", [1, 1], "BYTES")
    img.set_data_from_numpy(np.array([[a.jpeg.read_bytes()]], dtype=np.object_))
    r = c.infer(m + "_image", [img], outputs=[grpcclient.InferRequestedOutput("logits")])
    got = r.as_numpy("logits")
    check(rel(got, jpeg_want) <= 1e-5, "BYTES image logits match Classify")

    # UINT8 frames.
    frames = (np.arange(2 * 48 * 64 * 3) % 251).astype(np.uint8).reshape(2, 48, 64, 3)
    fr = grpcclient.InferInput("frame", [2, 48, 64, 3], "UINT8")
    fr.set_data_from_numpy(frames)
    got = c.infer(m + "_frame", [fr]).as_numpy("logits")
    check(got.shape == (2, 1000) and np.isfinite(got).all(), "UINT8 frames")

    # Priority and timeout request parameters.
    r = c.infer(m, [inp], priority=1, timeout=30_000_000)
    check(rel(r.as_numpy("logits"), want) <= 1e-5, "priority 1 with a 30 s timeout")
    try:
        c.infer(m, [inp], timeout=1)
        check(False, "a 1 us timeout must fail")
    except InferenceServerException as e:
        check("DEADLINE_EXCEEDED" in str(e.status()), f"timeout parameter -> {e.status()}")

    # Streaming: in order, with an error reported in its response.
    results = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer(m, [inp], request_id="s1")
    bad = grpcclient.InferInput("input", [1, 3, 10, 10], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 10, 10), np.float32))
    c.async_stream_infer(m, [bad], request_id="s2")
    c.async_stream_infer(m, [inp], request_id="s3")
    got = [results.get(timeout=60) for _ in range(3)]
    c.stop_stream()
    check(got[0][1] is None and got[0][0].get_response().id == "s1", "stream response 1")
    check(got[1][0] is None and got[1][1] is not None and "shape" in str(got[1][1]), f"stream error {got[1][1]}")
    check(got[2][1] is None and rel(got[2][0].as_numpy("logits"), want) <= 1e-5, "stream response 3")

    # Errors.
    for name, inputs, code in [
        ("resnet50_swsl", [inp], "NOT_FOUND"),
        (m, [bad], "INVALID_ARGUMENT"),
    ]:
        try:
            c.infer(name, inputs)
            check(False, f"{name} must fail")
        except InferenceServerException as e:
            check(code in str(e.status()), f"{code} for {name}: {e.message()[:80]}")
    wrong = grpcclient.InferInput("input", [1, 3, 224, 224], "FP16")
    wrong.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float16))
    try:
        c.infer(m, [wrong])
        check(False, "FP16 must fail")
    except InferenceServerException as e:
        check("INVALID_ARGUMENT" in str(e.status()), "wrong datatype")

    system_shared_memory(c, m, x, want)

    # Statistics count what was sent: infer calls (not the failed ones) and images.
    st = c.get_inference_statistics(m, as_json=True)["model_stats"][0]
    ok = int(st["inference_stats"]["success"]["count"])
    check(ok >= 8, f"success count {ok}")
    check(int(st["inference_count"]) >= 16, f"inference count {st['inference_count']}")
    check(int(st["inference_stats"]["fail"]["count"]) >= 3, "fail count")
    check(len(st["batch_stats"]) >= 1, "batch statistics")
    print("all tritonclient checks passed")


if __name__ == "__main__":
    main()
