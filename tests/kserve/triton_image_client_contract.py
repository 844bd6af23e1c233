#!/usr/bin/env python3
"""The contract a generic Triton image-classification client relies on, checked the way
Triton's own example client (src/python/examples/image_client.py, `parse_model` and
`postprocess`) checks a model, with tritonclient[grpc]: run by tests/kserve.rs
(`a_triton_image_client_takes_the_model_as_an_image_classifier`), which starts the
server and writes 2 input images and their logits (from resnet-serve's own API) into
--data.

Exits 0 and prints "image client contract holds", or exits 1 naming the broken part.
"""

import argparse
import pathlib
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def parse_model(model_metadata, model_config):
    """image_client.py's parse_model, on the JSON forms (as_json=True) of metadata and
    configuration: int64 fields come as strings there, the format as its enum name."""
    check(len(model_metadata["inputs"]) == 1,
          f"expecting 1 input, got {len(model_metadata['inputs'])}")
    check(len(model_metadata["outputs"]) == 1,
          f"expecting 1 output, got {len(model_metadata['outputs'])}")
    check(len(model_config["input"]) == 1,
          f"expecting 1 input in model configuration, got {len(model_config['input'])}")
    input_metadata = model_metadata["inputs"][0]
    input_config = model_config["input"][0]
    output_metadata = model_metadata["outputs"][0]
    check(output_metadata["datatype"] == "FP32",
          f"expecting output datatype to be FP32, model has {output_metadata['datatype']}")
    max_batch_size = int(model_config.get("max_batch_size", 0))

    # The output is a vector: every dimension but one is 1, the batch one aside.
    output_batch_dim = max_batch_size > 0
    non_one = 0
    for dim in (int(d) for d in output_metadata["shape"]):
        if output_batch_dim:
            output_batch_dim = False
        elif dim > 1:
            non_one += 1
    check(non_one == 1, f"expecting model output to be a vector, shape {output_metadata['shape']}")

    # The input has 3 dims, CHW or HWC, and the batch one when the model batches.
    input_batch_dim = max_batch_size > 0
    expected = 3 + (1 if input_batch_dim else 0)
    shape = [int(d) for d in input_metadata["shape"]]
    check(len(shape) == expected,
          f"expecting input to have {expected} dimensions, model has {len(shape)}")
    fmt = input_config.get("format", "FORMAT_NONE")
    fmt = mc.ModelInput.Format.Value(fmt) if isinstance(fmt, str) else fmt
    check(fmt in (mc.ModelInput.FORMAT_NCHW, mc.ModelInput.FORMAT_NHWC),
          f"unexpected input format {input_config.get('format')}, expecting FORMAT_NCHW or FORMAT_NHWC")
    if fmt == mc.ModelInput.FORMAT_NHWC:
        h, w, c = shape[1:] if input_batch_dim else shape
    else:
        c, h, w = shape[1:] if input_batch_dim else shape
    return (max_batch_size, input_metadata["name"], output_metadata["name"], c, h, w, fmt,
            input_metadata["datatype"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=pathlib.Path)
    a = p.parse_args()
    x = np.fromfile(a.data / "input.f32", dtype="<f4").reshape(2, 3, 224, 224)
    want = np.fromfile(a.data / "logits.f32", dtype="<f4").reshape(2, 1000)

    client = grpcclient.InferenceServerClient(url=a.url)
    metadata = client.get_model_metadata(model_name=a.model, as_json=True)
    config = client.get_model_config(model_name=a.model, as_json=True)["config"]
    max_batch_size, input_name, output_name, c, h, w, fmt, dtype = parse_model(metadata, config)
    check(max_batch_size >= 2, f"the model batches (max_batch_size {max_batch_size})")
    check(fmt == mc.ModelInput.FORMAT_NCHW and (c, h, w) == (3, 224, 224) and dtype == "FP32",
          f"one FP32 NCHW input of 3x224x224 ({input_name}: {dtype} {c}x{h}x{w}, format {fmt})")
    check(output_name == "logits", f"the output is the logits ({output_name})")

    # A batch of 2 with class_count=3, as image_client.py sends it (`-c 3 -b 2`).
    inp = grpcclient.InferInput(input_name, [2, c, h, w], dtype)
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput(output_name, class_count=3)
    result = client.infer(a.model, [inp], outputs=[out], request_id="image-client")
    check(result.get_response().id == "image-client", "the request id comes back")
    output_array = result.as_numpy(output_name)
    check(output_array is not None and len(output_array) == 2,
          f"one result per image of the batch ({None if output_array is None else output_array.shape})")
    for i, results in enumerate(output_array):
        check(len(results) == 3, f"image {i}: 3 classes")
        ranked = np.argsort(-want[i], kind="stable")[:3]
        for rank, entry in enumerate(results):
            # postprocess(): bytes, or a string when the array holds str.
            text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
            cls = text.split(":")
            check(len(cls) >= 3, f"'{text}' parses as score:index:label")
            score, index, label = float(cls[0]), int(cls[1]), ":".join(cls[2:])
            check(index == int(ranked[rank]) and abs(score - float(want[i][index])) < 1e-4 and label,
                  f"image {i} rank {rank}: {score} ({index}) = {label}")
    print("image client contract holds")


if __name__ == "__main__":
    main()
