#!/usr/bin/env python3
"""End-to-end check of `resnet-serve predict` against the model card's own recipe
(torch.hub-style model + torchvision transforms on PIL images) for one checkpoint file.

    python scripts/check_predict.py ARCH CHECKPOINT IMAGE...

Prints per image both top-5 lists and the logits' max|d|/max|ref|; exits 1 on a top-5
mismatch. Uses the release binary (built if needed).
"""

import json
import pathlib
import subprocess
import sys

import torch
from PIL import Image
from torchvision import transforms

from make_fixtures import build

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    arch, ckpt, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    model = build(arch)
    model.load_state_dict(torch.load(ckpt, map_location="cpu"), strict=True)
    model.eval()
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    out = subprocess.run(
        [str(ROOT / "target/release/resnet-serve"), "predict", "--model", f"{arch}_swsl", "--weights", ckpt,
         "--output", "logits", "--json", *images],
        check=True, capture_output=True, text=True,
    ).stdout
    ours = json.loads(out)
    ok = True
    for path, entry in zip(images, ours):
        with torch.no_grad():
            ref = model(tf(Image.open(path).convert("RGB")).unsqueeze(0))[0]
        got = torch.tensor(entry["logits"])
        same = ref.topk(5).indices.tolist() == got.topk(5).indices.tolist()
        err = float((got - ref).abs().max() / ref.abs().max())
        ok &= same
        print(f"{pathlib.Path(path).name}: torchvision top5 {ref.topk(5).indices.tolist()} "
              f"ours {got.topk(5).indices.tolist()} {'same' if same else 'DIFFERENT'}; max|d|/max|ref| {err:.2e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
