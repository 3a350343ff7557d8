"""Write tests/data/images: 103 real photographs in ImageNet's ImageFolder layout, one per class.

    pip download --no-deps scikit-image==0.26.0 -d /tmp/skd && unzip -q -d /tmp/skd /tmp/skd/scikit_image-0.26.0-*.whl
    python tests/data/make_images.py /tmp/skd/skimage/data            # rewrites tests/data/images

The sources are photographs bundled in the scikit-image 0.26.0 wheel (skimage/data/), only those whose
licence skimage's own notes (skimage/data/_fetchers.py) give as CC0 or public domain; SOURCES below holds
each one's provenance, and the README written beside the images repeats it with a table of every class.
Each class is one crop of one source photo: a position, size and aspect ratio drawn from a fixed seed,
downscaled where the crop is larger than the size drawn for it, saved as JPEG at quality 85-90, with
ImageNet's odd files among them (grayscale, CMYK, progressive, a PNG named .JPEG, an apostrophe).
The crops are the same on every run; the bytes are those of this Pillow's encoder (the README names its
version), so another Pillow may write other bytes for the same pixels.

Only Pillow is needed (no scikit-image install): the script reads the wheel's image files itself.
"""
from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
import PIL

NUM_CLASSES = 103
SEED = 24
SKIMAGE_VERSION = "0.26.0"
OUT = Path(__file__).resolve().parent / "images"


@dataclass(frozen=True)
class Source:
    file: str          # in skimage/data/
    name: str          # in class and file names
    crops: int         # how many classes are cut from it
    what: str
    provenance: str    # skimage's note, author and URL
    licence: str


SOURCES = [
    Source("astronaut.png", "astronaut", 13, "Eileen Collins, NASA astronaut (colour, 512x512)",
           "NASA Great Images database, https://flic.kr/p/r9qvLn", "public domain (\"No known copyright "
           "restrictions, released into the public domain\")"),
    Source("chelsea.png", "chelsea", 11, "Chelsea the cat (colour, 451x300)",
           "photograph by Stefan van der Walt", "CC0 (\"No copyright restrictions. CC0 by the photographer\")"),
    Source("coffee.png", "coffee", 13, "coffee cup, courtesy of Pikolo Espresso Bar (colour, 600x400)",
           "photograph by Rachel Michetti", "CC0 (\"No copyright restrictions. CC0 by the photographer\")"),
    Source("hubble_deep_field.jpg", "hubble", 13, "Hubble eXtreme Deep Field (colour, 1000x872)",
           "NASA, http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/",
           "public domain (NASA: \"may be freely used in the public domain\")"),
    Source("retina.jpg", "retina", 16, "fundus photograph of a normal left eye (colour, 1411x1411)",
           "Mikael Häggström, https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg",
           "CC0 1.0 Universal Public Domain Dedication"),
    Source("rocket.jpg", "rocket", 13, "Falcon 9 carrying DSCOVR lifting off (colour, 640x427)",
           "SpaceX, https://www.flickr.com/photos/spacexphotos/16511594820/",
           "public domain (released by SpaceX into the public domain)"),
    Source("camera.png", "camera", 4, "man with a camera on a tripod (grayscale, 512x512)",
           "photograph by Lav Varshney", "CC0 (\"No copyright restrictions. CC0 by the photographer\")"),
    Source("clock_motion.png", "clock", 4, "wall clock, motion blurred (grayscale, 400x300)",
           "photograph by Stefan van der Walt", "public domain (\"Released into the public domain by the "
           "photographer\")"),
    Source("text.png", "text", 2, "handwritten formulas on paper, photographed (grayscale, 448x172)",
           "Wikipedia, https://en.wikipedia.org/wiki/File:Corner.png",
           "public domain (\"No known copyright restrictions, released into the public domain\")"),
    Source("brick.png", "brick", 3, "brick wall (grayscale, 512x512)",
           "CC0Textures, https://cc0textures.com/view.php?tex=Bricks25 (perspective-corrected, rotated, cropped "
           "and scaled by scikit-image)", "CC0"),
    Source("grass.png", "grass", 3, "grass (grayscale, 512x512)",
           "linolafett on DeviantArt, https://www.deviantart.com/linolafett/art/Grass-01-434853879", "CC0"),
    Source("gravel.png", "gravel", 3, "gravel (grayscale, 512x512)",
           "CC0Textures, https://cc0textures.com/view.php?tex=Gravel04", "CC0"),
    Source("cell.png", "cell", 5, "a cell floating in saline: quantitative phase image from a digital hologram "
           "(grayscale, 550x660)", "Paul Müller et al., Optics Express 26(8): 10729-10743 (2018), "
           "doi:10.1364/OE.26.010729", "CC0 (\"This image is CC0, dedicated to the public domain\")"),
]
GRAYSCALE_SOURCES = {"camera", "clock", "text", "brick", "grass", "gravel", "cell"}

# The classes with a property of their own (class index -> (source, property)); every other class is a plain
# baseline RGB JPEG of a crop drawn at random. ImageNet's train set has all of these: about 2 % grayscale JPEGs,
# 22 CMYK JPEGs, one PNG named .JPEG (n02105855_2933.JPEG), progressive JPEGs, apostrophes in names.
SPECIAL = {
    7: ("camera", "grayscale"),     # one among tiny_shards' first 16 classes
    11: ("retina", "large"),        # >= 500 px on both sides, for reduced-size decoding at 1/2
    29: ("clock", "grayscale"),
    33: ("hubble", "large"),
    38: ("coffee", "cmyk"),
    45: ("chelsea", "apostrophe"),
    52: ("cell", "grayscale"),
    57: ("astronaut", "large"),
    61: ("rocket", "png"),
    74: ("text", "grayscale"),
    83: ("astronaut", "progressive"),
    88: ("retina", "large"),
    96: ("gravel", "grayscale"),
}
# The apostrophe's crop is placed by hand: Chelsea's eyes, as "chelsea's_eyes".
APOSTROPHE_BOX = (110, 60, 370, 190)

# Aspect ratios (width / height) as ImageNet's photographs have them: mostly 4:3 landscape.
ASPECTS = [4 / 3] * 8 + [3 / 4] * 3 + [1.0] * 3 + [3 / 2] * 3 + [2 / 3] + [16 / 9] + [5 / 4] + [4 / 5] + [2.1, 0.55]


@dataclass
class Crop:
    index: int
    source: Source
    box: tuple[int, int, int, int]   # in the source, (left, top, right, bottom)
    size: tuple[int, int]            # written, (width, height)
    mode: str                        # L, RGB or CMYK
    fmt: str                         # JPEG or PNG
    progressive: bool
    quality: int | None
    note: str

    @property
    def folder(self) -> str:
        return f"c{self.index:03d}_{self.source.name}"


def draw_size(rng: random.Random, large: bool, limit: tuple[int, int]) -> tuple[int, int]:
    """(width, height) to write: sides of 120-700 px like ImageNet's, both >= 500 when `large`; at most `limit`."""
    aspect = rng.choice(ASPECTS)
    if large:  # an aspect ratio and size the source can give without upscaling
        short = rng.randint(500, min(540, *limit))
        aspect = rng.choice([a for a in (1.0, 5 / 4, 4 / 5, 6 / 5, 5 / 6) if round(short * max(a, 1 / a)) <= max(limit)
                             and (a >= 1) == (limit[0] >= limit[1]) or a == 1.0])
    else:
        long_side = 500 if rng.random() < 0.3 else rng.randint(150, 480)  # ImageNet's commonest: 500 px wide
        short = max(120, round(long_side / max(aspect, 1 / aspect)))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    fit = min(1.0, limit[0] / w, limit[1] / h)   # never upscaled: a crop no larger than its source
    return max(1, int(w * fit)), max(1, int(h * fit))


def draw_box(rng: random.Random, size: tuple[int, int], source: tuple[int, int]) -> tuple[int, int, int, int]:
    """A crop of the source with `size`'s aspect ratio, 1 to 3.5 times `size` (then downscaled), anywhere in it."""
    most = min(source[0] / size[0], source[1] / size[1], 3.5)
    scale = rng.uniform(1.0, most) if most > 1 else 1.0
    w, h = min(source[0], round(size[0] * scale)), min(source[1], round(size[1] * scale))
    left, top = rng.randint(0, source[0] - w), rng.randint(0, source[1] - h)
    return left, top, left + w, top + h


# Where a source's crops may lie, (left, top, right, bottom): the retina photograph's corners are black.
REGIONS = {"retina.jpg": (200, 200, 1211, 1211)}


def plan(sizes: dict[str, tuple[int, int]]) -> list[Crop]:
    """Every class's crop, from the seed alone."""
    rng = random.Random(SEED)
    by_name = {s.name: s for s in SOURCES}
    pool = [s.name for s in SOURCES for _ in range(s.crops)]
    for name, _ in SPECIAL.values():
        pool.remove(name)
    rng.shuffle(pool)
    crops = []
    for index in range(NUM_CLASSES):
        name, prop = SPECIAL.get(index, (None, "plain"))
        source = by_name[name] if name else by_name[pool.pop()]
        region = REGIONS.get(source.file, (0, 0, *sizes[source.file]))
        limit = (region[2] - region[0], region[3] - region[1])
        if prop == "apostrophe":
            box = APOSTROPHE_BOX
            size = (box[2] - box[0], box[3] - box[1])
        else:
            size = draw_size(rng, prop == "large", limit)
            left, top, right, bottom = draw_box(rng, size, limit)
            box = (region[0] + left, region[1] + top, region[0] + right, region[1] + bottom)
        quality = rng.choice([85, 87, 89, 90])
        gray_source = source.name in GRAYSCALE_SOURCES
        mode = {"grayscale": "L", "cmyk": "CMYK"}.get(prop, "RGB")
        note = {"grayscale": "grayscale JPEG (mode L)", "cmyk": "CMYK JPEG", "png": "PNG file named .JPEG",
                "progressive": "progressive JPEG", "large": ">= 500 px on both sides",
                "apostrophe": "apostrophe in the file name"}.get(prop, "")
        if gray_source and mode == "RGB":
            note = "RGB JPEG of a grayscale photograph" + (f"; {note}" if note else "")
        crops.append(Crop(index, source, box, size, mode, "PNG" if prop == "png" else "JPEG",
                          prop == "progressive", None if prop == "png" else quality, note))
    assert not pool
    return crops


def file_name(crop: Crop, nth: int) -> str:
    if crop.note.endswith("apostrophe in the file name"):
        return f"{crop.folder}'s_eyes.JPEG"
    return f"{crop.folder}_{nth}.JPEG"


def encode(crop: Crop, photo: Image.Image) -> bytes:
    image = photo.crop(crop.box)
    if image.size != crop.size:
        image = image.resize(crop.size, Image.Resampling.LANCZOS)
    image = image.convert(crop.mode)
    out = io.BytesIO()
    if crop.fmt == "PNG":
        image.save(out, "PNG")
    else:
        image.save(out, "JPEG", quality=crop.quality, progressive=crop.progressive, optimize=crop.progressive)
    return out.getvalue()


def readme(crops: list[Crop], names: list[str], sizes: list[int]) -> str:
    lines = [
        "# tests/data/images",
        "",
        f"{NUM_CLASSES} real photographs in the torchvision `ImageFolder` layout (`train/<class>/<file>.JPEG`), one",
        "image per class, so that a label names its image: the tests' own images (conftest's `sample_images`",
        "fixture, and the benches' default input). They stand in for ImageNet with its quirks: sizes from about",
        "120 to 700 px a side in ImageNet's aspect ratios, a few of at least 500 px on both sides, grayscale",
        "(mode `L`) JPEGs, one CMYK JPEG, one progressive JPEG, one PNG file named `.JPEG`, and an apostrophe in",
        f"a file name. {sum(sizes) / 1e6:.2f} MB in all.",
        "",
        "## How they were made",
        "",
        "    pip download --no-deps scikit-image==0.26.0 -d /tmp/skd",
        "    unzip -q -d /tmp/skd /tmp/skd/scikit_image-0.26.0-*.whl",
        "    python tests/data/make_images.py /tmp/skd/skimage/data",
        "",
        f"Each class is a crop of one of the photographs bundled in the scikit-image {SKIMAGE_VERSION} wheel",
        f"(`skimage/data/`): position, size and aspect ratio drawn with seed {SEED}, downscaled (Lanczos) where the",
        "crop is larger than the size drawn for it, saved with Pillow at JPEG quality 85-90 (4:2:0). The crops",
        f"are the same on every run; the bytes here are Pillow {PIL.__version__}'s. Folder names sort in class order",
        "(`c000_…` to `c102_…`); the word after the number is the source photograph.",
        "",
        "## Sources and licences",
        "",
        "Only photographs whose licence scikit-image documents (`skimage/data/_fetchers.py`) as CC0 or public",
        "domain; the notes below are skimage's. Left out: skimage's drawings and synthetic images (horse, logo,",
        "phantom, color, chessboard), and the photographs whose notes give no licence or only \"no known",
        "copyright restrictions\" (moon, page, coins, immunohistochemistry, motorcycle stereo pair).",
        "",
        "| source | classes | what | provenance | licence |",
        "|---|---:|---|---|---|",
    ]
    for s in SOURCES:
        lines.append(f"| `{s.file}` | {s.crops} | {s.what} | {s.provenance} | {s.licence} |")
    lines += [
        "",
        "## Classes",
        "",
        "Crop box in the source as (left, top, right, bottom); size as written, width x height.",
        "",
        "| class | file | source | crop box | size | mode, format | bytes | note |",
        "|---|---|---|---|---|---|---:|---|",
    ]
    for crop, name, size in zip(crops, names, sizes, strict=True):
        fmt = crop.fmt + (f" q{crop.quality}" if crop.quality else "") + (" progressive" if crop.progressive else "")
        lines.append(f"| `{crop.folder}` | `{name}` | `{crop.source.file}` | {crop.box} | {crop.size[0]}x{crop.size[1]} "
                     f"| {crop.mode}, {fmt} | {size} | {crop.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("skimage_data", type=Path, help="the skimage/data folder of the scikit-image 0.26.0 wheel")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder to (re)write (default {OUT})")
    args = parser.parse_args(argv)
    missing = [s.file for s in SOURCES if not (args.skimage_data / s.file).is_file()]
    if missing:
        print(f"error: {args.skimage_data} lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    photos = {}
    for s in SOURCES:
        with Image.open(args.skimage_data / s.file) as im:
            photos[s.file] = im.convert("L" if s.name in GRAYSCALE_SOURCES else "RGB")
    crops = plan({f: p.size for f, p in photos.items()})

    if (args.out / "train").exists():
        shutil.rmtree(args.out / "train")
    names, sizes, seen = [], [], {}
    for crop in crops:
        seen[crop.source.name] = nth = seen.get(crop.source.name, -1) + 1
        name = file_name(crop, nth)
        data = encode(crop, photos[crop.source.file])
        folder = args.out / "train" / crop.folder
        folder.mkdir(parents=True)
        (folder / name).write_bytes(data)
        names.append(name)
        sizes.append(len(data))
    (args.out / "README.md").write_text(readme(crops, names, sizes))
    print(f"wrote {len(crops)} images, {sum(sizes) / 1e6:.2f} MB, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
