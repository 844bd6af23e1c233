#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures that resnet-serve's parity tests compare against.

Needs torch, torchvision, pillow, numpy, safetensors and scikit-image (for its bundled
photos); `scripts/setup_python.sh` makes a virtualenv with all of them. CI does not run
this: it only reads what this script wrote under `tests/fixtures/`.

What it writes:
- `arch_parity.safetensors`: for each of the six architectures, float64 PyTorch logits of
  a synthetic input on synthetic weights. Both come from the counter-based generator
  below, which `server/model/synthetic.rs` implements bit for bit, so the weights
  themselves (up to 776 MB) never need committing.
- `checkpoints/`: small `torch.save` files in the legacy and the zip format (nested
  dicts, storage offsets, shared storages, non-contiguous tensors, several dtypes), the
  expected contiguous tensors, and malicious pickles that name arbitrary globals.
- `images/` + `preprocess.safetensors`: real photos in several encodings and modes, the
  uint8 224x224 crop PIL + torchvision produce for each, and the float64 logits of the
  synthetic resnet18 on the full torchvision pipeline.
- `server/labels/imagenet_classes.txt`: torchvision's ImageNet-1k class names.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pathlib
import shutil

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

# ---------------------------------------------------------------------------------------
# The counter-based generator (mirrored by server/model/synthetic.rs).
# ---------------------------------------------------------------------------------------
M64 = (1 << 64) - 1
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for b in text.encode():
        h ^= b
        h = (h * 0x100000001B3) & M64
    return h


def uniform(key: str, n: int, lo: float, hi: float) -> np.ndarray:
    """n values in [lo, hi): element i comes from splitmix64(fnv1a64(key) + (i + 1) * golden)."""
    with np.errstate(over="ignore"):
        z = np.uint64(fnv1a64(key)) + (np.arange(1, n + 1, dtype=np.uint64) * GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return (lo + (hi - lo) * u).astype(np.float32)


def synthetic_range(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """The value range of one state-dict entry, chosen so activations stay realistic."""
    if name.endswith("running_mean"):
        return -0.1, 0.1
    if name.endswith("running_var"):
        return 0.5, 1.5
    if name == "fc.bias":
        return -0.05, 0.05
    if name == "fc.weight":
        bound = 3.0 * (3.0 / shape[1]) ** 0.5
        return -bound, bound
    if len(shape) == 4:  # convolution: He-uniform
        fan_in = shape[1] * shape[2] * shape[3]
        bound = (6.0 / fan_in) ** 0.5
        return -bound, bound
    if name.endswith("weight"):  # batch-norm gamma
        return 0.2, 0.6
    if name.endswith("bias"):  # batch-norm beta
        return -0.1, 0.1
    raise ValueError(f"no synthetic rule for {name}")


def synthetic_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(0, dtype=torch.int64)
            continue
        lo, hi = synthetic_range(name, tuple(t.shape))
        out[name] = torch.from_numpy(uniform(f"{seed}/{name}", t.numel(), lo, hi)).reshape(t.shape)
    return out


def synthetic_input(seed: int, batch: int, size: int) -> torch.Tensor:
    n = batch * 3 * size * size
    return torch.from_numpy(uniform(f"{seed}/input", n, -2.0, 2.0)).reshape(batch, 3, size, size)


# ---------------------------------------------------------------------------------------
# The architectures, as torch.hub's semi-supervised hubconf builds them.
# ---------------------------------------------------------------------------------------
ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1, 64),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], 32, 4),
    "resnext101_32x4d": (Bottleneck, [3, 4, 23, 3], 32, 4),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], 32, 8),
    "resnext101_32x16d": (Bottleneck, [3, 4, 23, 3], 32, 16),
}
SEED = 7
# Parity inputs: batch and spatial size per architecture (smaller for the giants, to keep
# the Rust test fast on two cores; global average pooling makes any size >= 32 valid).
PARITY_INPUT = {
    "resnet18": (2, 224),
    "resnet50": (2, 224),
    "resnext50_32x4d": (2, 224),
    "resnext101_32x4d": (1, 224),
    "resnext101_32x8d": (1, 160),
    "resnext101_32x16d": (1, 128),
}


def build(arch: str) -> ResNet:
    block, layers, groups, width = ARCHS[arch]
    return ResNet(block, layers, groups=groups, width_per_group=width)


def synthetic_model(arch: str) -> ResNet:
    model = build(arch)
    model.load_state_dict(synthetic_state_dict(model, SEED), strict=True)
    return model.eval()


def arch_parity() -> None:
    tensors = {}
    for arch, (batch, size) in PARITY_INPUT.items():
        model = synthetic_model(arch).double()
        x = synthetic_input(SEED, batch, size).double()
        with torch.no_grad():
            logits = model(x)
        tensors[f"{arch}.logits"] = logits.contiguous()
        print(f"{arch}: input {tuple(x.shape)} logits std {logits.std():.3f} "
              f"max|.| {logits.abs().max():.3f} top1 {logits.argmax(1).tolist()}")
    save_file(tensors, FIXTURES / "arch_parity.safetensors")


# ---------------------------------------------------------------------------------------
# Checkpoint-format fixtures.
# ---------------------------------------------------------------------------------------
class Evil:
    """Pickles as a call to os.system: a loader that executes it has lost."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def mixed_state() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict()
    sd["conv.weight"] = torch.randn(2, 3, 3, 3, generator=g)
    sd["shared.full"] = base
    sd["shared.rows"] = base[1:3]  # storage offset 6 into the same storage
    sd["shared.transposed"] = base.t()  # non-contiguous view of the same storage
    sd["strided"] = torch.randn(5, 8, generator=g)[:, ::3]  # stride 3 in the last dim
    sd["half"] = torch.randn(7, generator=g).half()
    sd["bfloat"] = torch.randn(3, 2, generator=g).bfloat16()
    sd["double"] = torch.randn(2, 2, generator=g).double()
    sd["bn.num_batches_tracked"] = torch.tensor(12345, dtype=torch.int64)
    sd["int32"] = torch.arange(-3, 3, dtype=torch.int32)
    sd["scalar"] = torch.tensor(2.5)
    return sd


def checkpoint_fixtures() -> None:
    out = FIXTURES / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    sd = mixed_state()
    expected = {k: v.contiguous().clone() for k, v in sd.items()}
    save_file(expected, out / "mixed_expected.safetensors")
    for legacy, suffix in ((True, "legacy"), (False, "zip")):
        kw = {"_use_new_zipfile_serialization": not legacy}
        torch.save(sd, out / f"mixed_{suffix}.pth", **kw)
        torch.save({"state_dict": sd, "epoch": 3, "arch": "test"}, out / f"nested_{suffix}.pth", **kw)
        prefixed = collections.OrderedDict((f"module.{k}", v) for k, v in sd.items())
        torch.save({"model": prefixed}, out / f"module_prefix_{suffix}.pth", **kw)
        torch.save({"weight": torch.ones(2), "payload": Evil()}, out / f"evil_{suffix}.pth", **kw)


# ---------------------------------------------------------------------------------------
# Preprocessing fixtures: real photos through PIL + torchvision.
# ---------------------------------------------------------------------------------------
def source_images() -> dict[str, bytes]:
    import skimage

    data = pathlib.Path(skimage.__file__).parent / "data"
    chelsea = Image.open(data / "chelsea.png").convert("RGB")  # 451x300 cat
    coffee = Image.open(data / "coffee.png").convert("RGB")  # 600x400
    astronaut = Image.open(data / "astronaut.png").convert("RGB")  # 512x512
    camera = Image.open(data / "camera.png")  # 512x512 grey
    rocket = data / "rocket.jpg"  # 427x640 baseline JPEG
    out: dict[str, bytes] = {}

    def enc(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    out["rocket.jpg"] = rocket.read_bytes()
    out["chelsea_q90.jpg"] = enc(chelsea, "JPEG", quality=90)
    out["coffee_444.jpg"] = enc(coffee, "JPEG", quality=95, subsampling=0)
    out["coffee.png"] = enc(coffee, "PNG")
    out["astronaut_odd.png"] = enc(astronaut.resize((333, 517), Image.BICUBIC), "PNG")
    out["camera_gray.png"] = enc(camera, "PNG")
    out["camera_gray.jpg"] = enc(camera, "JPEG", quality=90)
    rgba = chelsea.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(rgba.size)
    rgba.putalpha(alpha)
    out["chelsea_rgba.png"] = enc(rgba, "PNG")
    out["astronaut_palette.png"] = enc(astronaut.quantize(colors=200), "PNG")
    out["astronaut.gif"] = enc(astronaut.quantize(colors=256), "GIF")
    out["coffee_lossless.webp"] = enc(coffee, "WEBP", lossless=True)
    out["chelsea.bmp"] = enc(chelsea, "BMP")
    wide = coffee.resize((700, 230), Image.LANCZOS)
    out["wide_small.png"] = enc(wide, "PNG")
    tiny = chelsea.resize((97, 150), Image.BILINEAR)  # upscaled by Resize(256)
    out["tiny_up.png"] = enc(tiny, "PNG")
    # 16-bit grey (PIL mode I;16): PIL's convert("RGB") clips at 255 rather than scaling.
    grey16 = Image.fromarray((np.asarray(camera, dtype=np.uint16) * 2).astype(np.uint16))
    out["camera_gray16.png"] = enc(grey16, "PNG")
    return out


def preprocess_fixtures() -> None:
    imgdir = FIXTURES / "images"
    if imgdir.exists():
        shutil.rmtree(imgdir)
    imgdir.mkdir(parents=True)
    crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    full = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    model = synthetic_model("resnet18").double()
    tensors = {}
    for name, data in source_images().items():
        (imgdir / name).write_bytes(data)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        cropped = np.asarray(crop(img), dtype=np.uint8)
        tensors[f"{name}.crop"] = torch.from_numpy(cropped.copy())
        with torch.no_grad():
            logits = model(full(img).unsqueeze(0).double())[0]
        tensors[f"{name}.logits"] = logits.contiguous()
        print(f"{name}: {img.size} mode {Image.open(io.BytesIO(data)).mode} "
              f"top5 {logits.topk(5).indices.tolist()}")
    save_file(tensors, FIXTURES / "preprocess.safetensors")


def labels() -> None:
    cats = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(cats) == 1000
    (ROOT / "server" / "labels").mkdir(parents=True, exist_ok=True)
    (ROOT / "server" / "labels" / "imagenet_classes.txt").write_text("\n".join(cats) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["arch", "checkpoints", "preprocess", "labels"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    steps = {"labels": labels, "checkpoints": checkpoint_fixtures,
             "preprocess": preprocess_fixtures, "arch": arch_parity}
    for name, step in steps.items():
        if args.only in (None, name):
            step()


if __name__ == "__main__":
    main()
