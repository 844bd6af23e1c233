#!/usr/bin/env python3
"""Writes full-size synthetic checkpoints the way the hub files were written (legacy
`torch.save`, named `<stem>-<sha256[:8]>.pth`), plus zip and safetensors copies.

These are too big to commit; they back the manual checks in BENCHMARKS.md (loading
memory, `predict` on a legacy hub-style file vs torchvision). Usage:

    python scripts/make_checkpoints.py OUT_DIR resnet50 [resnext101_32x16d ...]
"""

import hashlib
import pathlib
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_fixtures import SEED, build, synthetic_state_dict  # noqa: E402


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for arch in sys.argv[2:]:
        sd = synthetic_state_dict(build(arch), SEED)
        tmp = out / f"synthetic_{arch}.tmp"
        torch.save(sd, tmp, _use_new_zipfile_serialization=False)
        sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
        legacy = out / f"synthetic_{arch}-{sha[:8]}.pth"
        tmp.rename(legacy)
        torch.save(sd, out / f"synthetic_{arch}.zip.pth")
        save_file({k: v.contiguous() for k, v in sd.items()}, out / f"synthetic_{arch}.safetensors")
        print(legacy)


if __name__ == "__main__":
    main()
