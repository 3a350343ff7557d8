"""JPEG → pixels: reduced-size DCT decode on the CPU, batched nvJPEG decode on the GPU, and the per-sample
augmentation parameters both paths share.

CPU workers (the default, `--decode cpu`): `SampleDecoder` decodes one sample's bytes and applies timm's DeiT
transform. RandomResizedCrop's box depends only on the image's size, which the JPEG header gives before any pixel
is decoded: the box is drawn first (timm's own `get_params`, same seed, same draw), then libjpeg is asked to decode
at 1/2, 1/4 or 1/8 scale (`Image.draft`) when the box at that scale is still at least the output size, and the box
is mapped onto the smaller image. Evaluation's resize (and --no-aug's) the same way, against the resize's size.
Where no scale qualifies the full-size path runs unchanged, bit for bit; `reduced_decode=False` turns it off
everywhere (bit-compatibility with earlier runs).

GPU (`--decode gpu`): the loader workers only read the bytes and draw each sample's parameters (`sample_params`:
crop box from the header, flip, RandAugment ops and magnitudes, from the same seeded per-sample generators as the
CPU path, in the same order, so the parameters are the CPU path's own). The batch is decoded on the device
(`decode_jpegs`, one function whatever the backend), cropped, resized, flipped and augmented there with each
sample's own parameters (`augment_batch`). Files the hardware decoder does not take (not JPEG, CMYK, progressive)
are decoded by the worker on the CPU and travel as pixels, counted.
"""
from __future__ import annotations

import functools
import io
import logging
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T

__all__ = ["resolve_decode", "reduction_factor", "SampleDecoder", "SampleParams", "sample_params",
           "apply_params_pil", "check_gpu_recipe", "JpegBatch", "decode_jpegs", "decode_batch", "augment_batch",
           "randaugment_of", "decoder_backend", "DecodeStats"]

_logger = logging.getLogger(__name__)

REDUCE_FACTORS = (8, 4, 2)   # the DCT scalings libjpeg offers through PIL's draft (1/8, 1/4, 1/2)


def resolve_decode(mode: str, device: torch.device | str) -> Literal["cpu", "gpu"]:
    """`auto` is gpu on a CUDA device, cpu elsewhere; cpu and gpu as they are (gpu on a CPU device runs the device
    path there: the tests do)."""
    if mode not in ("cpu", "gpu", "auto"):
        raise ValueError(f"Unknown decode mode {mode!r}: use cpu, gpu or auto.")
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if mode == "auto":
        return "gpu" if on_cuda else "cpu"
    return mode  # type: ignore[return-value]


# --- reduced-size decode on the CPU ---------------------------------------------------------------------------

def reduction_factor(region: tuple[float, float], needed: tuple[int, int]) -> int:
    """The largest DCT scale-down d (8, 4, 2; else 1) at which a region of `region` (w, h) source pixels is still
    at least `needed` (w, h) pixels: decoding at 1/d then never upsamples what the full decode would downsample."""
    for d in REDUCE_FACTORS:
        if region[0] / d >= needed[0] and region[1] / d >= needed[1]:
            return d
    return 1


def _pil_resample(interpolation: Any) -> int:
    return TF.pil_modes_mapping[interpolation] if isinstance(interpolation, T.InterpolationMode) else interpolation


def _load_rgb(img: Image.Image, factor: int) -> Image.Image:
    """Decode an opened image (at 1/factor scale where it is a JPEG and factor > 1) as RGB."""
    if factor > 1:
        w, h = img.size
        img.draft(img.mode, (w // factor, h // factor))  # PIL picks exactly 1/factor for this request
    img.load()
    return img.convert("RGB")  # grayscale and CMYK JPEGs are real in ImageNet


class SampleDecoder:
    """Bytes of one image → timm's transform of it, seeded per sample; with `reduced`, decoded at the smallest
    DCT scale that loses nothing the transform's first resize keeps (same boxes, same random draws)."""

    def __init__(self, transform: T.Compose, reduced: bool = False) -> None:
        self.transform, self.reduced = transform, reduced
        ops = list(transform.transforms)
        self.first = ops[0] if ops and isinstance(ops[0], (RandomResizedCropAndInterpolation, T.Resize)) else None
        self.rest = T.Compose(ops[1:])

    def __call__(self, data: bytes, seed: int, seed_fn: Callable[[int], None]) -> torch.Tensor:
        image, finish = self.decode(data, seed, seed_fn)
        return finish(image)

    def decode(self, data: bytes, seed: int, seed_fn: Callable[[int], None]) -> tuple[Image.Image, Callable]:
        """The decoded image up to the transform's first resize, and what is left of the transform (the part a
        damaged file cannot make fail: the stream counts what this raises as a corrupt sample, and what the rest
        raises as a failed augmentation; both are skipped and replaced)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd EXIF and palettes: the image is still usable
            with Image.open(io.BytesIO(data)) as img:
                if not self.reduced or self.first is None:
                    rgb = _load_rgb(img, 1)
                    seed_fn(seed)   # after the decode, as before reduced decoding existed: the same draws
                    return rgb, self.transform
                seed_fn(seed)  # before the box is drawn: the full path draws it first thing after seeding too
                if isinstance(self.first, RandomResizedCropAndInterpolation):
                    return self._crop(img), self.rest
                return self._resize(img), self.rest

    def _crop(self, img: Image.Image) -> Image.Image:
        """timm's RandomResizedCropAndInterpolation.__call__, with the box drawn from the header's size."""
        crop = self.first
        full = img.size
        i, j, h, w = crop.get_params(img, crop.scale, crop.ratio)  # reads img.size only
        interpolation = (random.choice(crop.interpolation) if isinstance(crop.interpolation, (tuple, list))
                         else crop.interpolation)
        out_h, out_w = crop.size
        factor = reduction_factor((w, h), (out_w, out_h))
        rgb = _load_rgb(img, factor)
        if rgb.size == full:
            return TF.resized_crop(rgb, i, j, h, w, list(crop.size), interpolation)
        # Pixel k of a 1/d decode covers source pixels [k d, (k + 1) d): the box maps by 1/d exactly (the last
        # row and column of an odd-sized image are partial blocks, and no box reaches past them).
        d = factor if rgb.size == (-(-full[0] // factor), -(-full[1] // factor)) else full[0] / rgb.size[0]
        return rgb.resize((out_w, out_h), _pil_resample(interpolation), box=(j / d, i / d, (j + w) / d, (i + h) / d))

    def _resize(self, img: Image.Image) -> Image.Image:
        """torchvision's Resize (evaluation, --no-aug), its output size computed from the header's size."""
        resize = self.first
        full = img.size
        size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        out_h, out_w = TF._compute_resized_output_size((full[1], full[0]), size, resize.max_size)
        factor = reduction_factor(full, (out_w, out_h))
        rgb = _load_rgb(img, factor)
        if rgb.size == full:
            return resize(rgb)
        d = factor if rgb.size == (-(-full[0] // factor), -(-full[1] // factor)) else full[0] / rgb.size[0]
        return rgb.resize((out_w, out_h), _pil_resample(resize.interpolation), box=(0, 0, full[0] / d, full[1] / d))


# --- per-sample parameters (the GPU path draws them in the workers) -------------------------------------------

@dataclass(frozen=True)
class SampleParams:
    """One sample's augmentation, drawn from its seeded generators exactly as timm's transform draws it."""
    size: tuple[int, int]                         # the source image's (w, h), from its header
    box: tuple[int, int, int, int]                # RandomResizedCrop's (top, left, height, width); Resize: all
    out: tuple[int, int]                          # the box resized to (h, w)
    center: Optional[tuple[int, int]] = None      # CenterCrop's (h, w) of the resized box (timm's --no-aug)
    flip: bool = False
    ops: tuple[tuple[str, tuple[float, ...]], ...] = ()   # RandAugment ops applied, in order, with their arguments
    interpolation: int = int(Image.Resampling.BICUBIC)    # PIL resample of the crop's resize


# The ops of timm's rand-m*-inc1 policy both paths know (timm's _RAND_INCREASING_TRANSFORMS).
DEVICE_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
              "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def check_gpu_recipe(transform: T.Compose) -> None:
    """Raise ValueError, in one sentence, for a training transform the device path does not apply."""
    for op in transform.transforms:
        if isinstance(op, RandAugment):
            unknown = sorted({o.name for o in op.ops} - set(DEVICE_OPS))
            if unknown or any(isinstance(o.kwargs["resample"], (tuple, list)) for o in op.ops):
                raise ValueError(f"--decode gpu applies timm's rand-m*-inc1 RandAugment ops with one interpolation; "
                                 f"this recipe has {unknown or 'a random interpolation'}: use --decode cpu.")
        elif not isinstance(op, (RandomResizedCropAndInterpolation, T.RandomHorizontalFlip, MaybePILToTensor,
                                 T.Resize, T.CenterCrop)):
            raise ValueError(f"--decode gpu does not apply {type(op).__name__} on the device (no colour jitter with "
                             "RandAugment off): use --decode cpu for this recipe.")


def sample_params(transform: T.Compose, img: Image.Image, seed: int, seed_fn: Callable[[int], None]) -> SampleParams:
    """The parameters timm's training `transform` would draw for `img` (opened, not decoded: only its size is
    read) after `seed_fn(seed)`: the same generator calls in the same order, so `apply_params_pil` on the
    decoded image equals `transform` on it, pixel for pixel (tests/test_decode.py)."""
    seed_fn(seed)
    box, flip, ops, out, center, interpolation = None, False, [], None, None, int(Image.Resampling.BICUBIC)
    for op in transform.transforms:
        if isinstance(op, RandomResizedCropAndInterpolation):
            box = op.get_params(img, op.scale, op.ratio)
            mode = random.choice(op.interpolation) if isinstance(op.interpolation, (tuple, list)) else op.interpolation
            interpolation, out = _pil_resample(mode), tuple(op.size)
        elif isinstance(op, T.Resize):      # timm's --no-aug: the whole image resized, then centre-cropped
            size = [op.size] if isinstance(op.size, int) else list(op.size)
            out = tuple(TF._compute_resized_output_size((img.size[1], img.size[0]), size, op.max_size))
            box, interpolation = (0, 0, img.size[1], img.size[0]), _pil_resample(op.interpolation)
        elif isinstance(op, T.CenterCrop):
            center = tuple(op.size)
        elif isinstance(op, T.RandomHorizontalFlip):
            flip = bool(torch.rand(1) < op.p)
        elif isinstance(op, RandAugment):
            chosen = np.random.choice(op.ops, op.num_layers, replace=op.choice_weights is None, p=op.choice_weights)
            ops.extend(entry for entry in (_draw_op(o) for o in chosen) if entry is not None)
        elif not isinstance(op, MaybePILToTensor):
            raise ValueError(f"sample_params cannot draw {type(op).__name__}: use --decode cpu for this recipe.")
    if box is None:
        raise ValueError("sample_params needs a RandomResizedCrop or a Resize first: use --decode cpu for this "
                         "recipe.")
    return SampleParams(size=tuple(img.size), box=tuple(box), out=out, center=center, flip=flip, ops=tuple(ops),
                        interpolation=interpolation)


def _draw_op(op: AugmentOp) -> Optional[tuple[str, tuple[float, ...]]]:
    """timm's AugmentOp.__call__ without the image: whether it applies, and its arguments (same draws)."""
    if op.prob < 1.0 and random.random() > op.prob:
        return None
    magnitude = op.magnitude
    if op.magnitude_std > 0:
        magnitude = random.uniform(0, magnitude) if op.magnitude_std == float("inf") else \
            random.gauss(magnitude, op.magnitude_std)
    magnitude = max(0., min(magnitude, op.magnitude_max or 10.))   # timm's _LEVEL_DENOM
    args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
    return op.name, tuple(args)


def randaugment_of(transform: T.Compose) -> Optional[RandAugment]:
    """timm's RandAugment inside a transform, None when the recipe has none."""
    return next((op for op in transform.transforms if isinstance(op, RandAugment)), None)


def apply_params_pil(img: Image.Image, params: SampleParams, transform: T.Compose) -> torch.Tensor:
    """`params` applied to a decoded image with timm's own PIL ops: the CPU reference of the device path."""
    i, j, h, w = params.box
    out = TF.resized_crop(img, i, j, h, w, list(params.out), T.InterpolationMode(
        {v: k for k, v in TF.pil_modes_mapping.items() if k.value != "nearest-exact"}[params.interpolation]))
    if params.center:
        out = TF.center_crop(out, list(params.center))
    if params.flip:
        out = TF.hflip(out)
    ra = randaugment_of(transform)
    by_name = {op.name: op for op in ra.ops} if ra else {}
    for name, args in params.ops:
        op = by_name[name]
        out = op.aug_fn(out, *args, **op.kwargs)
    return TF.pil_to_tensor(out)


# --- the GPU path: bytes in the batch, decode and augmentation on the device ----------------------------------

@dataclass
class JpegBatch:
    """What a loader worker hands over on the GPU path: per sample either its JPEG bytes (uint8 [n]) or, where the
    hardware decoder does not take the file, its CPU-decoded pixels (uint8 [3, H, W]); and its parameters."""
    data: list[torch.Tensor]
    params: list[SampleParams]
    decoded_on_cpu: list[bool]
    fill: tuple[int, int, int] = (124, 116, 104)  # RandAugment's fill colour (timm: the mean in 0..255)

    def __len__(self) -> int:
        return len(self.data)

    def _packed(self, pin: bool = False) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
        """The JPEGs' bytes as one buffer with their lengths, and the worker-decoded pixels."""
        encoded = [d for d, cpu in zip(self.data, self.decoded_on_cpu, strict=True) if not cpu]
        packed = torch.cat(encoded) if encoded else torch.empty(0, dtype=torch.uint8)
        pixels = [d for d, cpu in zip(self.data, self.decoded_on_cpu, strict=True) if cpu]
        if pin:
            packed, pixels = packed.pin_memory(), [p.pin_memory() for p in pixels]
        return packed, [d.numel() for d in encoded], pixels

    @classmethod
    def _unpack(cls, packed: torch.Tensor, lengths: list[int], pixels: list[torch.Tensor], params: list[SampleParams],
                decoded_on_cpu: list[bool], fill: tuple[int, int, int]) -> "JpegBatch":
        views, images = iter(torch.split(packed, lengths)), iter(pixels)
        return cls([next(images) if cpu else next(views) for cpu in decoded_on_cpu], params, decoded_on_cpu, fill)

    def __reduce__(self):
        # Across the loader's process boundary as one buffer: a tensor per JPEG would be one shared-memory handle
        # per sample, which capped a worker at ~1,600 images/s (measured: docs/decode.md).
        return JpegBatch._unpack, (*self._packed(), self.params, self.decoded_on_cpu, self.fill)

    def pin_memory(self) -> "JpegBatch":  # the DataLoader's pin thread calls this
        return JpegBatch._unpack(*self._packed(pin=True), self.params, self.decoded_on_cpu, self.fill)


@dataclass
class DecodeStats:
    """What the device path decoded where: counted per process, logged by the training loop."""
    device: int = 0
    worker_cpu: int = 0        # decoded by the loader worker (not JPEG, CMYK, progressive)
    refused: int = 0           # JPEGs the device decoder refused, decoded on the CPU here instead
    undecodable: int = 0       # refused by PIL too (damage the worker's checks missed): the fill colour, logged

    def __str__(self) -> str:
        text = (f"{self.device} images decoded on the device, {self.worker_cpu} by the loader workers "
                f"(not JPEG, CMYK or progressive), {self.refused} refused by the device decoder and decoded on the CPU")
        return text + (f", {self.undecodable} undecodable (trained as the fill colour)" if self.undecodable else "")


def needs_cpu_decode(img: Image.Image) -> bool:
    """Files nvJPEG does not take or takes slowly: not JPEG, CMYK/YCCK, progressive (FIELD-NOTES "Feeding a GPU")."""
    return img.format != "JPEG" or img.mode not in ("RGB", "L") or bool(img.info.get("progressive")) \
        or bool(img.info.get("progression"))


def worker_sample(data: bytes, transform: T.Compose, seed: int,
                  seed_fn: Callable[[int], None]) -> tuple[torch.Tensor, SampleParams, bool]:
    """A GPU-path worker's share of one sample: open the header, check the file is whole (a corrupt one raises
    here, in the worker, so it is skipped and replaced as on the CPU path), draw the parameters, and pass the
    bytes on (or the pixels, where the device decoder would refuse them)."""
    from .shards import jpeg_is_complete

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and not jpeg_is_complete(data):
                raise OSError("truncated JPEG: no end-of-image marker after the last scan")
            params = sample_params(transform, img, seed, seed_fn)
            if needs_cpu_decode(img):
                img.load()
                return TF.pil_to_tensor(img.convert("RGB")), params, True
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), params, False


# The JPEG decoder of the GPU path, named here and nowhere else: TorchCodec, whose PyPI wheels carry nvJPEG and
# which supersedes torchvision's image decoders (deprecated since our pinned 0.29); torchvision's where TorchCodec
# does not import (not installed, or built for another torch, as on a GPU node with its own torch). docs/decode.md.
PREFERRED_DECODER: Literal["torchcodec", "torchvision"] = "torchcodec"


@functools.lru_cache(maxsize=None)
def _decoder() -> tuple[str, Callable[..., Any]]:
    """(backend name, decode function taking a list of uint8 byte tensors and `device=`), RGB out."""
    if PREFERRED_DECODER == "torchcodec":
        try:
            from torchcodec.decoders import decode_jpeg as torchcodec_decode
            return "torchcodec", functools.partial(torchcodec_decode, mode="RGB")
        except Exception as err:  # noqa: BLE001  (ImportError, or OSError from a library built for another torch)
            _logger.warning("TorchCodec does not load here (%s: %s); decoding with torchvision's decode_jpeg.",
                            type(err).__name__, err)
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode
    return "torchvision", functools.partial(torchvision_decode, mode=ImageReadMode.RGB)


def decoder_backend() -> str:
    """Which library decodes the GPU path's JPEGs in this process: "torchcodec" or "torchvision"."""
    return _decoder()[0]


def decode_jpegs(blobs: Sequence[torch.Tensor], device: torch.device | str) -> list[Optional[torch.Tensor]]:
    """JPEG bytes → RGB uint8 [3, H, W] images on `device`, one batched call (nvJPEG on CUDA, libjpeg-turbo on the
    CPU); None for an image the decoder refused."""
    if not blobs:
        return []
    _, decode = _decoder()
    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torchvision's decoders warn that they are deprecated
        try:
            return list(decode(list(blobs), device=device))
        except Exception:  # noqa: BLE001  (one refused image fails the whole batched call: find it below)
            pass
        out: list[Optional[torch.Tensor]] = []
        for blob in blobs:
            try:
                out.append(decode([blob], device=device)[0])
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def _pil_decode(blob: torch.Tensor) -> Optional[torch.Tensor]:
    """The CPU decode of a JPEG the device decoder refused; None where PIL cannot decode it either."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(blob.cpu().numpy().tobytes())) as img:
                img.load()
                return TF.pil_to_tensor(img.convert("RGB"))
    except Exception:  # noqa: BLE001  (PIL raises many types for damaged bytes)
        return None


# The ops below work on float [N, 3, H, W] batches holding 0..255 values, each with its own argument per sample
# (a [N] tensor), and quantise to 8 bits after each op as PIL's 8-bit images do. They follow PIL's arithmetic
# (ImageEnhance blends, the L conversion's weights, ImageOps LUTs, AFFINE's pixel-centre inverse mapping and its
# bicubic filter), so that each op gives PIL's pixels; tests/test_decode.py states how close they come.

def _q(x: torch.Tensor) -> torch.Tensor:
    """Back to 8 bits, truncating as PIL's blends do."""
    return x.clamp_(0, 255).floor_()


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB → L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as [N, 1, H, W]."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor): degenerate + factor (x - degenerate), clipped, truncated."""
    return _q(degenerate + _col(factor) * (x - degenerate))


def _autocontrast(x: torch.Tensor, _: Sequence[torch.Tensor]) -> torch.Tensor:
    """ImageOps.autocontrast per channel: its LUT int(v * scale + offset), in double as PIL computes it."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True).double(), x.amax(dim=(2, 3), keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp_min(1)
    stretched = torch.trunc(x.double() * scale - lo * scale).clamp(0, 255)
    return torch.where(hi > lo, stretched, x.double())


def _equalize(x: torch.Tensor, _: Sequence[torch.Tensor]) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F2
    return F2.equalize(x.to(torch.uint8)).float()


def _invert(x: torch.Tensor, _: Sequence[torch.Tensor]) -> torch.Tensor:
    return 255 - x


def _posterize(x: torch.Tensor, args: Sequence[torch.Tensor]) -> torch.Tensor:
    bits = args[0].long().clamp(0, 8)
    mask = (255 - (2 ** (8 - bits) - 1)).to(torch.uint8)   # bits ≥ 8: unchanged
    return (x.to(torch.uint8) & _col(mask)).float()


def _solarize(x: torch.Tensor, args: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.where(x >= _col(args[0]), 255 - x, x)


def _solarize_add(x: torch.Tensor, args: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.where(x < 128, (x + _col(args[0])).clamp_max(255), x)


def _color(x: torch.Tensor, args: Sequence[torch.Tensor]) -> torch.Tensor:
    return _blend(_gray(x).expand_as(x), x, args[0])


def _contrast(x: torch.Tensor, args: Sequence[torch.Tensor]) -> torch.Tensor:
    mean = torch.floor(_gray(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, args[0])


def _brightness(x: torch.Tensor, args: Sequence[torch.Tensor]) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, args[0])


def _sharpness(x: torch.Tensor, args: Sequence[torch.Tensor]) -> torch.Tensor:
    kernel = torch.tensor([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]], device=x.device) / 13
    smooth = nnf.conv2d(x.reshape(-1, 1, *x.shape[2:]), kernel.view(1, 1, 3, 3)).view(x.shape[0], 3,
                                                                                      x.shape[2] - 2, x.shape[3] - 2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5)   # PIL's SMOOTH keeps the border pixels
    return _blend(degenerate, x, args[0])


def _pil_cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """PIL's BICUBIC macro (libImaging/Geometry.c): cubic convolution with a = -1 through v1..v4 at offset d."""
    return v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (-v1 + v2 - v3 + v4)))


def _affine(x: torch.Tensor, coeffs: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's Image.transform(size, AFFINE, (a, b, c, d, e, f), BICUBIC) per sample, as libImaging computes it:
    output pixel centre (x, y) takes the input at (a x + b y + c, d x + e y + f), outside the image the fill
    colour, inside PIL's own bicubic (a = -1, neighbours clamped to the edge, in double, truncated to 8 bits)."""
    n, channels, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=x.device, dtype=torch.float64) + 0.5, indexing="ij")
    a, b, c, d, e, f = (coeffs[:, k].double().view(n, 1, 1) for k in range(6))
    u, v = a * xs + b * ys + c, d * xs + e * ys + f
    inside = ((u >= 0) & (u < w) & (v >= 0) & (v < h)).unsqueeze(1)
    left, top = torch.floor(u - 0.5), torch.floor(v - 0.5)
    dx, dy = (u - 0.5 - left).unsqueeze(1), (v - 0.5 - top).unsqueeze(1)
    cols = [(left + k - 1).clamp(0, w - 1).long() for k in range(4)]
    rows = [(top + k - 1).clamp(0, h - 1).long() for k in range(4)]
    flat = x.double().reshape(n, channels, h * w)

    def at(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        index = (row * w + col).view(n, 1, h * w).expand(n, channels, h * w)
        return flat.gather(2, index).view(n, channels, h, w)

    row_values = [_pil_cubic(*(at(row, col) for col in cols), dx) for row in rows]
    out = _pil_cubic(*row_values, dy).clamp(0, 255).floor()   # (UINT8)v truncates
    return torch.where(inside, out, fill.double().view(1, 3, 1, 1))


def _rotation_coeffs(degrees: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """PIL's Image.rotate(degrees) as AFFINE coefficients (about the centre, counter-clockwise)."""
    angle = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return torch.stack((cos, sin, c, -sin, cos, f), dim=1).float()


def _geometric(kind: str) -> Callable:
    def op(x: torch.Tensor, args: Sequence[torch.Tensor], fill: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        v = args[0].float()
        one, zero = torch.ones_like(v), torch.zeros_like(v)
        coeffs = {"Rotate": lambda: _rotation_coeffs(v, w, h),
                  "ShearX": lambda: torch.stack((one, v, zero, zero, one, zero), 1),
                  "ShearY": lambda: torch.stack((one, zero, zero, v, one, zero), 1),
                  "TranslateXRel": lambda: torch.stack((one, zero, v * w, zero, one, zero), 1),
                  "TranslateYRel": lambda: torch.stack((one, zero, zero, zero, one, v * h), 1)}[kind]()
        return _affine(x, coeffs, fill)
    return op


_POINT_OPS: dict[str, Callable] = {
    "AutoContrast": _autocontrast, "Equalize": _equalize, "Invert": _invert, "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add, "ColorIncreasing": _color,
    "ContrastIncreasing": _contrast, "BrightnessIncreasing": _brightness, "SharpnessIncreasing": _sharpness}
_GEOMETRIC_OPS = {name: _geometric(name) for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")}


def _apply_op(name: str, x: torch.Tensor, args: Sequence[torch.Tensor], fill: torch.Tensor) -> torch.Tensor:
    """One op on a float batch of 8-bit values; arguments in float64 (PIL blends in double), result in x's dtype."""
    out = _GEOMETRIC_OPS[name](x, args, fill) if name in _GEOMETRIC_OPS else _POINT_OPS[name](x, args)
    return out.to(x.dtype)


def augment_batch(images: torch.Tensor, ops: Sequence[Sequence[tuple[str, tuple[float, ...]]]],
                  fill: Sequence[int] = (124, 116, 104), grouped: bool = True) -> torch.Tensor:
    """RandAugment with each sample's own ops (uint8 [B, 3, H, W] → uint8): a batched transforms.v2.RandAugment
    would apply one draw to the whole batch, which is not the recipe. `grouped`: layer by layer, the samples that
    drew the same op run as one batched call with their own arguments; else one call per sample and op (the
    reference; both give the same pixels)."""
    x = images.float()
    fill_t = torch.tensor(fill, dtype=x.dtype, device=x.device)
    if not grouped:
        for k, sample_ops in enumerate(ops):
            for name, args in sample_ops:
                arg_t = [torch.tensor([a], dtype=torch.float64, device=x.device) for a in args]
                x[k:k + 1] = _apply_op(name, x[k:k + 1], arg_t, fill_t)
        return x.to(torch.uint8)
    for layer in range(max((len(o) for o in ops), default=0)):
        groups: dict[str, list[int]] = {}
        for k, sample_ops in enumerate(ops):
            if layer < len(sample_ops):
                groups.setdefault(sample_ops[layer][0], []).append(k)
        for name, members in groups.items():
            index = torch.tensor(members, device=x.device)
            n_args = len(ops[members[0]][layer][1])
            arg_t = [torch.tensor([ops[k][layer][1][a] for k in members], dtype=torch.float64, device=x.device)
                     for a in range(n_args)]
            x[index] = _apply_op(name, x[index], arg_t, fill_t)
    return x.to(torch.uint8)


def crop_resize_flip(images: Sequence[torch.Tensor], params: Sequence[SampleParams]) -> torch.Tensor:
    """Each decoded uint8 [3, H, W] image cropped at its box, resized (antialiased, PIL's interpolation) to the
    output size and flipped where drawn: uint8 [B, 3, h, w] on the images' device."""
    from torchvision.transforms.v2 import functional as F2

    modes = {int(Image.Resampling.BICUBIC): T.InterpolationMode.BICUBIC,
             int(Image.Resampling.BILINEAR): T.InterpolationMode.BILINEAR}
    out = []
    for image, p in zip(images, params, strict=True):
        i, j, h, w = p.box
        crop = F2.resized_crop(image, i, j, h, w, list(p.out), interpolation=modes.get(p.interpolation,
                               T.InterpolationMode.BICUBIC), antialias=True)
        if p.center:
            crop = F2.center_crop(crop, list(p.center))
        out.append(crop.flip(-1) if p.flip else crop)
    return torch.stack(out)


def decode_batch(batch: JpegBatch, device: torch.device | str, stats: Optional[DecodeStats] = None,
                 grouped: Optional[bool] = None) -> torch.Tensor:
    """A worker's JpegBatch → uint8 [B, 3, h, w] on `device`: JPEGs decoded there in one call (refused ones on
    the CPU here, counted), the worker's CPU-decoded pixels copied, then each sample's crop, flip and ops.
    `grouped` (default: on CUDA) runs RandAugment as one call per op and layer rather than per sample: on a GPU that
    is ~15 kernel launches per layer instead of a few per sample; on a CPU per sample measured 1.35x faster (the
    gathers and scatters of grouping are copies there; docs/decode.md)."""
    device = torch.device(device)
    grouped = device.type == "cuda" if grouped is None else grouped
    stats = stats if stats is not None else DecodeStats()
    blobs = [k for k, cpu in enumerate(batch.decoded_on_cpu) if not cpu]
    images: list[Optional[torch.Tensor]] = [None] * len(batch)
    if device.type == "cuda":
        # vision#9606: nvJPEG on H100/H200 corrupted memory when decoding on the caller's stream. Decode on a
        # stream of its own (its allocations come from that stream's pool, so it need not wait for the caller's
        # queued work) and wait for it here; the images are then used on the caller's stream, recorded there.
        caller, decode_stream = torch.cuda.current_stream(device), _decode_stream(device)
        with torch.cuda.stream(decode_stream):
            decoded = decode_jpegs([batch.data[k] for k in blobs], device)
        decode_stream.synchronize()
        for image in decoded:
            if image is not None:
                image.record_stream(caller)
    else:
        decoded = decode_jpegs([batch.data[k] for k in blobs], device)
    for k, image in zip(blobs, decoded, strict=True):
        if image is None:
            stats.refused += 1
            image = _pil_decode(batch.data[k])
            if image is None:
                image = _fill_image(batch.params[k], batch.fill)
                stats.undecodable += 1
                _logger.warning("A JPEG of the batch decodes neither on the device nor with PIL; it is trained on "
                                "as the fill colour. Check the shards with build_shards.py --verify.")
            image = image.to(device)
        else:
            stats.device += 1
        images[k] = image
    for k, cpu in enumerate(batch.decoded_on_cpu):
        if cpu:
            stats.worker_cpu += 1
            images[k] = batch.data[k].to(device, non_blocking=True)
    crops = crop_resize_flip(images, batch.params)
    return augment_batch(crops, [p.ops for p in batch.params], batch.fill, grouped=grouped)


def _fill_image(params: SampleParams, fill: Sequence[int]) -> torch.Tensor:
    """A source-sized image of the fill colour, for the crop of a sample no decoder could read."""
    w, h = params.size
    return torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w).contiguous()


def _identity(x: Any) -> Any:
    return x


_DECODE_STREAMS: dict[torch.device, Any] = {}


def _decode_stream(device: torch.device) -> "torch.cuda.Stream":
    """One decode stream per GPU for the process (see device._side_stream on why not one per loader)."""
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _DECODE_STREAMS[device]


# --- what the stream's workers run per sample -------------------------------------------------------------------

@dataclass
class CpuSampleStage:
    """The CPU path's per-sample work in a worker: decode (reduced where it pays) and the transform's rest."""
    decoder: SampleDecoder

    def decode(self, data: bytes, seed: int, seed_fn: Callable[[int], None]) -> tuple[Any, Callable]:
        return self.decoder.decode(data, seed, seed_fn)

    @staticmethod
    def collate(images: Sequence[Any]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(image) for image in images])


@dataclass
class GpuSampleStage:
    """The GPU path's per-sample work in a worker: header, whole-file check, parameters; bytes on to the device."""
    transform: T.Compose
    fill: tuple[int, int, int] = (124, 116, 104)

    def __post_init__(self) -> None:
        check_gpu_recipe(self.transform)
        ra = randaugment_of(self.transform)
        if ra is not None and ra.ops:
            self.fill = tuple(int(c) for c in ra.ops[0].kwargs["fillcolor"])

    def decode(self, data: bytes, seed: int, seed_fn: Callable[[int], None]) -> tuple[Any, Callable]:
        return worker_sample(data, self.transform, seed, seed_fn), _identity

    def collate(self, samples: Sequence[tuple[torch.Tensor, SampleParams, bool]]) -> JpegBatch:
        data, params, cpu = zip(*samples, strict=True)
        return JpegBatch(list(data), list(params), list(cpu), self.fill)
