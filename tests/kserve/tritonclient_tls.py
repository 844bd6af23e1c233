#!/usr/bin/env python3
"""Python's tritonclient[grpc] over TLS (mutual, when a client certificate is given)
with a bearer token, against a running resnet-serve; run by tests/tls.rs
(`tritonclient_over_tls_with_a_token`), which starts the server with a CA made in the
test.

Exits 0 and prints "all tritonclient TLS checks passed", or exits 1 naming the failed
check.
"""

import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="host:port")
    p.add_argument("--model", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--token", required=True)
    a = p.parse_args()

    c = grpcclient.InferenceServerClient(
        a.url,
        ssl=True,
        root_certificates=a.ca,
        private_key=a.key,
        certificate_chain=a.cert,
    )
    auth = {"authorization": f"Bearer {a.token}"}

    check(c.is_server_live(headers=auth), "is_server_live over TLS with the token")
    try:
        c.get_model_metadata(a.model)
        check(False, "model metadata without the token is refused")
    except InferenceServerException as e:
        check("UNAUTHENTICATED" in str(e.status()), f"no token: {e.status()}")

    meta = c.get_model_metadata(a.model, headers=auth, as_json=True)
    check(meta["name"] == a.model, f"model metadata names {meta['name']}")
    name = meta["inputs"][0]["name"]
    x = np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)
    inp = grpcclient.InferInput(name, [1, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(x)
    out_name = meta["outputs"][0]["name"]
    r = c.infer(a.model, [inp], headers=auth)
    logits = r.as_numpy(out_name)
    check(logits is not None and logits.shape == (1, 1000) and np.isfinite(logits).all(),
          f"one inference over TLS: {out_name} {None if logits is None else logits.shape}")
    print("all tritonclient TLS checks passed")


if __name__ == "__main__":
    main()
