"""ImageFolder -> WebDataset tar shards plus one manifest per split (the writing side of the data path).

Per split: list the files in torchvision's ImageFolder order -> seeded permutation -> cut into
shards by count and bytes (the plan) -> write the shards in a process pool, each to a temporary
name renamed when complete -> write the manifest last. The plan depends only on the listing and
the options, never on the number of workers, so the bytes do not either, and a rerun after an
interruption keeps the shards already written. Whether a file is kept is decided per file by its
own bytes, so it can be decided inside the worker that writes the shard. Every split's labels are
indices into the training split's class folders, so a label means the same class in train and val.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import stat
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from webdataset import TarWriter

from ..atomic import write_atomic  # moved there; this name stays importable from here

log = logging.getLogger(__name__)

FORMAT = "antismooth-shards/1"
PLAN_FORMAT = "antismooth-shards-plan/1"
DEFAULT_SPLITS = ("train", "val")
TRAIN_SPLIT = "train"  # its class folders number the labels of every split, so cls means one class everywhere
UNKNOWN_CLASS_REASON = f"class folder that {TRAIN_SPLIT}/ does not have (left out by --skip-unknown-classes)"
# ~110 kB per ImageNet image: 2,500 samples make ~280 MB shards and 513 train shards, enough for
# 64 ranks x 8 loader workers to each own one (fewer shards than readers hangs: webdataset#188).
DEFAULT_MAX_COUNT = 2500
DEFAULT_MAX_SIZE_MB = 500.0  # the cap for datasets of larger images: still one sequential read per shard
DEFAULT_QUALITY = 90

# PIL's name of a format -> the extension a sample stores it under (readers pick the decoder by it).
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
                     "BMP": "bmp", "TIFF": "tiff", "PPM": "ppm"}
# Only these decoders are tried: a file in any other format is skipped, never parsed by a rare plugin.
# (MPO has no opener of its own: PIL's JPEG opener returns MPO images.)
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

TAR_BLOCK = 512
TAR_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads every archive to a multiple of this
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")  # the split is part of each __key__, which must hold no dots
ProgressFn = Callable[[int, int], None]  # (images done, input bytes done) since the last call


class BadImage(ValueError):
    """An input file that cannot go into a shard; the message is the reason listed in the manifest."""


@dataclass(frozen=True)
class ShardOptions:
    """The settings that determine the output bytes; recorded in the manifest and compared on resume."""

    seed: int = 0
    max_count: int = DEFAULT_MAX_COUNT
    max_size_mb: float = DEFAULT_MAX_SIZE_MB
    max_size: int | None = None  # re-encode images whose shorter side exceeds this; None keeps the bytes
    quality: int = DEFAULT_QUALITY  # JPEG quality of re-encoded images
    decode_check: bool = False  # fully decode every image instead of the structural check
    # FFCV's max_resolution: re-encode images whose longer side exceeds this at that side; None keeps the bytes.
    # Fields from here on are recorded (and hashed into the plan) only when set, so a build made before they
    # existed still resumes and verifies as the same plan.
    max_side: int | None = None
    max_side_quality: int = DEFAULT_QUALITY  # JPEG quality of images re-encoded by max_side

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"max_count must be at least 1 sample per shard, got {self.max_count}.")
        if not self.max_size_mb > 0:
            raise ValueError(f"max_size_mb must be a positive number of megabytes, got {self.max_size_mb}.")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"max_size must be a positive number of pixels (or unset), got {self.max_size}.")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be between 1 and 100, got {self.quality}.")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be a positive number of pixels (or unset), got {self.max_side}.")
        if not 1 <= self.max_side_quality <= 100:
            raise ValueError(f"max_side_quality must be between 1 and 100, got {self.max_side_quality}.")

    def record(self) -> dict:
        """The options as the plan header and manifest record them (and the plan digest hashes them): the fields
        added after the first format only when they differ from their defaults, so older builds stay resumable."""
        record = dataclasses.asdict(self)
        for name in _LATER_OPTIONS:
            if record[name] == _OPTION_DEFAULTS[name]:
                del record[name]
        return record


_LATER_OPTIONS = ("max_side", "max_side_quality")  # ShardOptions fields added after antismooth-shards/1 was fixed
_OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ShardOptions)}


@dataclass(frozen=True, slots=True)  # slots: ImageNet's train split lists 1.28 M of these
class SourceFile:
    """One listed input file; n is its index in the split's ImageFolder order and names its sample."""

    n: int
    path: str  # relative to the split folder, '/'-separated
    cls: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SplitListing:
    """Everything the plan depends on: the class list, the candidate files and what listing skipped."""

    split: str
    root: str
    classes: tuple[str, ...]  # what each cls means: the training split's folders (a superset of this split's)
    files: tuple[SourceFile, ...]
    skipped: tuple[tuple[str, str], ...]  # (relative path, reason)


@dataclass(frozen=True)
class ShardPlan:
    """The samples of one shard, in the order they are written."""

    name: str
    samples: tuple[SourceFile, ...]


@dataclass(frozen=True)
class ShardResult:
    """What writing (or re-checking) one shard produced; becomes its manifest entry."""

    name: str
    num_samples: int
    bytes: int
    sha256: str
    skipped: tuple[tuple[str, str], ...]
    reencoded: int = 0  # images stored re-encoded (max_size / max_side)

    def entry(self) -> dict:
        """The manifest's view of the shard."""
        return {"name": self.name, "num_samples": self.num_samples, "bytes": self.bytes, "sha256": self.sha256}

    def record(self) -> dict:
        """The resume journal's view: the manifest entry plus the files this shard skipped."""
        return {**self.entry(), "skipped": [list(s) for s in self.skipped], "reencoded": self.reencoded}

    @classmethod
    def from_record(cls, r: dict) -> ShardResult:
        """Inverse of record(); raises KeyError/TypeError/ValueError on a damaged record."""
        return cls(str(r["name"]), int(r["num_samples"]), int(r["bytes"]), str(r["sha256"]),
                   tuple((str(p), str(why)) for p, why in r["skipped"]), int(r.get("reencoded", 0)))


@dataclass(frozen=True)
class BuildReport:
    """The result of building one split: its manifest and how many shards this run wrote or kept."""

    manifest: dict
    written: int
    kept: int


# ----------------------------------------------------------------------------------------------
# Small helpers


def json_bytes(obj: object, indent: int | None = None) -> bytes:
    """UTF-8 JSON with sorted keys; file names that are not valid Unicode fall back to \\u escapes."""
    separators = (",", ": ") if indent else (",", ":")
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=indent, separators=separators).encode()
    except UnicodeEncodeError:  # a name with undecodable bytes (surrogate escapes): ASCII JSON still round-trips
        return json.dumps(obj, sort_keys=True, ensure_ascii=True, indent=indent, separators=separators).encode()


def sample_key(split: str, n: int) -> str:
    """The webdataset __key__ of sample n: unique within the dataset, no dots, no slashes."""
    return f"{split}_{n:08d}"


def sample_json(path: str, wnid: str, cls: int) -> bytes:
    """The sample's json field: its original relative path, so nothing about the input is lost."""
    return json_bytes({"path": path, "wnid": wnid, "cls": cls})


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of a split."""
    return f"{split}-{index:06d}.tar"


def _padded(size: int) -> int:
    """Bytes a tar member of `size` bytes takes: a header block plus the data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_size(member_bytes: int) -> int:
    """Size of a tar holding members of `member_bytes` in all: two end blocks, padded to a record."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def sample_tar_bytes(f: SourceFile, wnid: str) -> int:
    """Bytes one sample adds to a shard when its image is stored unchanged."""
    return _padded(len(str(f.cls))) + _padded(f.size) + _padded(len(sample_json(f.path, wnid, f.cls)))


def name_list(names: Sequence[str], limit: int = 5) -> str:
    """Names for a message: the first `limit` of them, then how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Listing: the ImageFolder walk, with every odd entry recorded instead of raised


def find_splits(src: str, splits: Sequence[str] = DEFAULT_SPLITS) -> list[str]:
    """The split folders (of `splits`) present under src, in the order given."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src} is not a folder; point it at the folder that holds train/ and val/.")
    for split in splits:
        if not SPLIT_NAME.fullmatch(split):
            raise ValueError(f"split name {split!r} may only hold letters, digits, '_' and '-' (it is part of "
                             "every sample key); rename the folder or pass other --splits.")
    found = [s for s in splits if os.path.isdir(os.path.join(src, s))]
    if not found:
        raise FileNotFoundError(f"{src} holds none of the split folders {', '.join(splits)}; --src must be the "
                                "folder that contains them (ImageFolder layout: train/<wnid>/<image>).")
    return found


def _is_dir(entry: os.DirEntry) -> bool:
    """entry.is_dir() following symlinks, False where even that fails (a symlink loop, no permission)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def find_classes(split_dir: str) -> list[str]:
    """Class folder names in torchvision's order (sorted, empty folders included), so index i means one class."""
    try:
        with os.scandir(split_dir) as it:
            classes = sorted(e.name for e in it if _is_dir(e))
    except OSError as e:
        raise FileNotFoundError(f"cannot read {split_dir}: {e.strerror}; check --src and its permissions.") from None
    if not classes:
        raise FileNotFoundError(f"{split_dir} holds no class folders; it must be in the ImageFolder layout "
                                "<split>/<wnid>/<image>.")
    return classes


def _walk(path: str, rel: str, ancestors: frozenset[str],
          skipped: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(relative folder, sorted file names) for a folder and every folder below it, following symlinks.

    Like os.walk(followlinks=True), which torchvision uses, but a folder that links back to one of its
    own ancestors is recorded as a symlink loop instead of being walked forever.
    """
    real = os.path.realpath(path)
    if real in ancestors:
        skipped.append((rel, "symlink loop: this folder links back to a folder that contains it"))
        return []
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as e:
        skipped.append((rel, f"unreadable folder: {e.strerror}"))
        return []
    files = sorted(e.name for e in entries if not _is_dir(e))
    found = [(rel, files)]
    for name in sorted(e.name for e in entries if _is_dir(e)):
        found += _walk(os.path.join(path, name), f"{rel}/{name}", ancestors | {real}, skipped)
    return found


def _stat_problem(path: str) -> tuple[os.stat_result | None, str | None]:
    """stat() a listed file, following symlinks; on failure, the reason it cannot be used."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "symlink loop: the link never reaches a file"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return None, "dangling symlink: its target does not exist"
        return None, f"unreadable: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file (a pipe, socket or device)"
    if st.st_size == 0:
        return None, "empty file (0 bytes)"
    return st, None


def training_classes(src: str) -> tuple[str, ...] | None:
    """The class folders of src's training split, which number every split's labels; None without one."""
    root = os.path.join(src, TRAIN_SPLIT)
    return tuple(find_classes(root)) if os.path.isdir(root) else None


def _unknown_classes_message(split: str, unknown: Sequence[str]) -> str:
    """One sentence refusing a split's class folders that the training split lacks."""
    return (f"{split}/ has {len(unknown)} class folder(s) that {TRAIN_SPLIT}/ does not have ({name_list(unknown)}), "
            f"so no label of the training split could name them; add them to {TRAIN_SPLIT}/, remove them from "
            f"{split}/, or pass --skip-unknown-classes to leave them out.")


def list_split(src: str, split: str, classes: Sequence[str] | None = None,
               skip_unknown: bool = False) -> SplitListing:
    """List one split in ImageFolder order (sorted classes, then sorted folders, then sorted names).

    `classes` (the training split's) numbers the labels; None numbers them by the split's own folders.
    A folder not in `classes` raises ValueError, or with skip_unknown is left out and listed as skipped.
    """
    root = os.path.join(src, split)
    folders = find_classes(root)
    classes = tuple(folders) if classes is None else tuple(classes)
    index = {wnid: i for i, wnid in enumerate(classes)}
    unknown = [wnid for wnid in folders if wnid not in index]
    if unknown and not skip_unknown:
        raise ValueError(_unknown_classes_message(split, unknown))
    skipped: list[tuple[str, str]] = [(wnid, UNKNOWN_CLASS_REASON) for wnid in unknown]
    with os.scandir(root) as it:
        for entry in sorted(it, key=lambda e: e.name):
            if not _is_dir(entry):
                skipped.append((entry.name, "not inside a class folder (ImageFolder reads <split>/<class>/<image>)"))
    files: list[SourceFile] = []
    top = frozenset({os.path.realpath(root)})
    for wnid in folders:
        if wnid not in index:
            continue
        for folder, names in sorted(_walk(os.path.join(root, wnid), wnid, top, skipped)):
            for name in names:
                rel = f"{folder}/{name}"
                st, problem = _stat_problem(os.path.join(root, rel))
                if problem:
                    skipped.append((rel, problem))
                else:
                    files.append(SourceFile(len(files), rel, index[wnid], st.st_size, st.st_mtime_ns))
    log.info("%s: %d files in %d of %d classes, %d skipped while listing", split, len(files),
             len(folders) - len(unknown), len(classes), len(skipped))
    return SplitListing(split, os.path.abspath(root), classes, tuple(files), tuple(skipped))


def list_splits(src: str, splits: Sequence[str] = DEFAULT_SPLITS, skip_unknown: bool = False) -> list[SplitListing]:
    """List every split of `splits` found under src, all labelled by the training split's classes.

    The training split's folders count even when it is not among `splits`: a val/ built alone must get
    the labels a model trained on train/ uses. Every layout and class error surfaces here, before any write.
    """
    found = find_splits(src, splits)
    classes = training_classes(src)
    return [list_split(src, split, classes, skip_unknown) for split in found]


# ----------------------------------------------------------------------------------------------
# Planning: permutation and cuts, fixed before anything is written


def shuffled(files: Sequence[SourceFile], seed: int) -> list[SourceFile]:
    """A seeded permutation; each file's place depends only on (seed, n), not on Python's random module.

    ImageFolder order is sorted by class, and class-sorted shards defeat a finite shuffle buffer.
    Hashing keeps the assignment stable across interpreter versions, so resumes stay valid.
    """
    return sorted(files, key=lambda f: hashlib.blake2b(b"%d:%d" % (seed, f.n), digest_size=8).digest())


def plan_shards(listing: SplitListing, options: ShardOptions) -> list[ShardPlan]:
    """Cut the shuffled files into shards of at most max_count samples and max_size_mb megabytes.

    Sizes are those of the input files plus tar headers, so the limit holds exactly when images are
    stored unchanged (with max_size or max_side it bounds the pre-re-encode size). A lone larger file gets its own shard.
    """
    max_bytes = int(options.max_size_mb * 1_000_000)
    shards: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    current_bytes = 0
    for f in shuffled(listing.files, options.seed):
        b = sample_tar_bytes(f, listing.classes[f.cls])
        if current and (len(current) >= options.max_count or tar_file_size(current_bytes + b) > max_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(f)
        current_bytes += b
    if current:
        shards.append(current)
    return [ShardPlan(shard_name(listing.split, i), tuple(s)) for i, s in enumerate(shards)]


def plan_digest(listing: SplitListing, options: ShardOptions) -> str:
    """A hash of everything the shard bytes depend on: format, options, classes and the input listing."""
    h = hashlib.sha256(json_bytes({"format": FORMAT, "split": listing.split, "classes": list(listing.classes),
                                   "options": options.record()}))
    for f in listing.files:
        h.update(f"{f.n}\0{f.path}\0{f.cls}\0{f.size}\0{f.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Per-image work: identify, check, optionally shrink


def jpeg_is_complete(data: bytes) -> bool:
    """True when an end-of-image marker follows the last start-of-scan; a truncated JPEG lacks one.

    Inside entropy-coded data every 0xFF is stuffed (FF 00) or a restart marker, so FF D9 / FF DA
    found there are real markers; an EXIF thumbnail's own EOI comes before the main scan's SOS.
    """
    eoi = data.rfind(b"\xff\xd9")
    return eoi > data.find(b"\xff\xda") >= 0 and data.find(b"\xff\xda", eoi) < 0


def decode_image(im: Image.Image) -> None:
    """Decode every pixel block of an opened image (raises on truncated or broken data).

    JPEGs decode at 1/8 scale: libjpeg still reads every block of the entropy-coded data, so
    truncation fails just the same, at about a third of the cost of a full-size decode.
    """
    if im.format in ("JPEG", "MPO"):
        im.draft(im.mode, (1, 1))
    im.load()


def probe_image(data: bytes, decode: bool = False) -> tuple[str, tuple[int, int]]:
    """Identify an encoded image by its content and check it is whole: (extension, (width, height)).

    Raises BadImage with the reason otherwise. The default check is structural (headers, JPEG end
    marker, PNG chunk CRCs; other formats are decoded); decode=True decodes every image.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    fmt = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd EXIF, palettes...; the image is still usable
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                fmt, size = im.format, im.size
                if decode:
                    decode_image(im)
                elif fmt in ("JPEG", "MPO"):
                    if not jpeg_is_complete(data):
                        raise BadImage("truncated JPEG: no end-of-image marker after the last scan")
                elif fmt == "PNG":
                    im.verify()  # walks every chunk to IEND and checks its CRC
                else:
                    im.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image in a supported format (" + ", ".join(PIL_FORMATS) + ")") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on malformed data
        raise BadImage(f"corrupt {fmt or 'image'}: {e}") from None
    return FORMAT_EXTENSIONS[fmt], size


def shrink_image(data: bytes, max_size: int | None, quality: int, max_side: int | None = None) -> bytes:
    """Re-encode an image as JPEG scaled down so that its shorter side is at most max_size and its longer side
    at most max_side (whichever shrinks it more; L stays L, else RGB)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                new_size = shrunk_size(im.size, max_size, max_side)
                if new_size is None:
                    raise ValueError(f"{im.size[0]}x{im.size[1]} needs no shrinking")
                im.draft(im.mode, new_size)  # JPEG: let libjpeg decode at the smallest scale still >= new_size
                img = im if im.mode in ("RGB", "L") else im.convert("RGB")
                img = img.resize(new_size, Image.Resampling.BICUBIC)
                out = io.BytesIO()
                img.save(out, "JPEG", quality=quality)
    except Exception as e:  # same reason as in probe_image
        raise BadImage(f"cannot re-encode: {e}") from None
    return out.getvalue()


def shrunk_size(size: tuple[int, int], max_size: int | None, max_side: int | None) -> tuple[int, int] | None:
    """The size an image of `size` is re-encoded at (aspect ratio kept), or None when it is stored as it is:
    max_size bounds the shorter side, max_side (FFCV's max_resolution) the longer one."""
    w, h = size
    scales = [limit / side for limit, side in ((max_size, min(w, h)), (max_side, max(w, h)))
              if limit is not None and side > limit]
    if not scales:
        return None
    scale = min(scales)
    return max(1, round(w * scale)), max(1, round(h * scale))


def image_for_shard(data: bytes, options: ShardOptions) -> tuple[str, bytes]:
    """Check one input image and return (extension, bytes to store): its own bytes unless max_size or max_side
    shrinks it (then at max_side_quality where max_side is what binds, else at quality)."""
    ext, (w, h) = probe_image(data, decode=options.decode_check)
    new_size = shrunk_size((w, h), options.max_size, options.max_side)
    if new_size is None:
        return ext, data
    by_side = new_size == shrunk_size((w, h), None, options.max_side)
    quality = options.max_side_quality if by_side else options.quality
    return "jpg", shrink_image(data, options.max_size, quality, options.max_side)


# ----------------------------------------------------------------------------------------------
# Writing one shard (runs in a worker process)


class _HashingWriter:
    """A write-only file object that hashes what passes through, so a shard's sha256 needs no re-read."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard."""

    plan: ShardPlan
    split: str
    src_dir: str
    out_dir: str
    classes: tuple[str, ...]
    options: ShardOptions
    journal: str


def _read_input(path: str) -> bytes:
    """Read one input file; any OSError here is the file's problem and becomes a skip reason."""
    with open(path, "rb") as f:
        return f.read()


def write_shard(task: ShardTask) -> ShardResult:
    """Write one planned shard to a temporary name, journal its record, then rename it.

    So a shard under its final name is complete and has its record, whenever the build is killed.

    webdataset's TarWriter writes the members with fixed metadata (mtime 0, mode 0o444, empty
    user/group; uid/gid are TarInfo's 0) and in sorted field order, so the bytes are reproducible.
    ShardWriter does not fit: it cuts shards as it goes, and here the cuts are planned up front.
    """
    final = os.path.join(task.out_dir, task.plan.name)
    tmp = f"{final}.{os.getpid()}.tmp"  # per process: a worker orphaned by a killed build never renames ours
    skipped: list[tuple[str, str]] = []
    count = reencoded = 0
    try:
        with open(tmp, "wb") as f:
            sink = _HashingWriter(f)
            with TarWriter(sink, user="", group="", mode=0o444, mtime=0, encoder=False) as tar:
                for s in task.plan.samples:
                    try:
                        raw = _read_input(os.path.join(task.src_dir, s.path))
                        ext, data = image_for_shard(raw, task.options)
                    except BadImage as e:
                        skipped.append((s.path, str(e)))
                        continue
                    except OSError as e:
                        skipped.append((s.path, f"unreadable: {e.strerror or e}"))
                        continue
                    wnid = task.classes[s.cls]
                    tar.write({"__key__": sample_key(task.split, s.n), ext: data,
                               "cls": str(s.cls).encode("ascii"), "json": sample_json(s.path, wnid, s.cls)})
                    count += 1
                    reencoded += data is not raw
        result = ShardResult(task.plan.name, count, sink.size, sink.sha.hexdigest(), tuple(skipped), reencoded)
        _append_record(task.journal, result)
        os.replace(tmp, final)
    except OSError as e:
        raise OSError(f"cannot write shard {tmp}: {e.strerror or e}; check free space and permissions "
                      "under --out.") from None
    return result


# ----------------------------------------------------------------------------------------------
# Worker pool


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle; it terminates the pool on the way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerPool:
    """imap_unordered over `workers` processes, or in this process when workers == 1."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}.")
        self.workers = workers
        self._pool = None
        if workers > 1:
            # fork: no re-import of torch/timm (pulled in by `import antismooth`) in every worker.
            ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self._pool = ctx.Pool(workers, initializer=_ignore_sigint)

    def imap(self, fn: Callable, items: Iterable) -> Iterator:
        """Results of fn over items, in completion order."""
        if self._pool is None:
            return map(fn, items)
        return self._pool.imap_unordered(fn, items, chunksize=1)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


# ----------------------------------------------------------------------------------------------
# Output folder state: resume, refuse, overwrite


def _plan_path(out: str, split: str) -> str:
    """The plan header: which plan (digest) and options the split's files in out belong to."""
    return os.path.join(out, f".plan-{split}.json")


def _journal_path(out: str, split: str) -> str:
    """The resume journal: one record per completed shard, appended by the worker that wrote it."""
    return os.path.join(out, f".done-{split}.jsonl")


def _own_files(out: str, split: str) -> list[str]:
    """This split's files in out: shards, manifest, plan, journal and their temporaries; nothing else."""
    sp = re.escape(split)
    pattern = re.compile(rf"({sp}-\d{{6}}\.tar(\.\d+)?|{sp}\.json|\.plan-{sp}\.json|\.done-{sp}\.jsonl)(\.tmp)?")
    return sorted(os.path.join(out, n) for n in os.listdir(out) if pattern.fullmatch(n))


def _read_plan(out: str, split: str) -> dict | None:
    """The plan header an earlier run left in out, or None when there is none (or it is unreadable)."""
    try:
        header = json.loads(Path(_plan_path(out, split)).read_bytes())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) and header.get("format") == PLAN_FORMAT else None


def _append_record(journal: str, result: ShardResult) -> None:
    """Append one shard's record with a single O_APPEND write, so records of parallel workers never mix."""
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, json_bytes(result.record()) + b"\n")
    finally:
        os.close(fd)


def _read_journal(journal: str) -> dict[str, ShardResult]:
    """The shard records in a journal; a line cut short by a kill (or otherwise damaged) is ignored."""
    records = {}
    try:
        lines = Path(journal).read_bytes().splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            r = ShardResult.from_record(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue
        records[r.name] = r
    return records


def _write_journal(journal: str, results: Iterable[ShardResult]) -> None:
    """Rewrite the journal atomically, sorted by shard, so it does not depend on worker timing."""
    write_atomic(journal, b"".join(json_bytes(r.record()) + b"\n" for r in sorted(results, key=lambda r: r.name)))


def _built_classes(out: str, split: str, header: dict) -> list[str] | None:
    """The class list the existing shards were labelled by: the plan header's, else the manifest's (older builds)."""
    if isinstance(header.get("classes"), list):
        return header["classes"]
    try:
        return [c["wnid"] for c in load_manifest(os.path.join(out, f"{split}.json"))["classes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mismatch_message(out: str, split: str, header: dict | None, options: ShardOptions,
                      classes: Sequence[str]) -> str:
    """One sentence saying why the existing output cannot be resumed and what to do."""
    fix = "rebuild with --overwrite to replace them, or choose another --out."
    if header is None:
        return f"{out} already holds {split} shards from an unknown build (no .plan-{split}.json); {fix}"
    old = header.get("options", {})
    diff = [f"{k}={old.get(k, _OPTION_DEFAULTS[k])!r} there, {v!r} now"
            for k, v in dataclasses.asdict(options).items() if old.get(k, _OPTION_DEFAULTS[k]) != v]
    if diff:
        return f"{out} already holds {split} shards built with other options ({'; '.join(diff)}); {fix}"
    built = _built_classes(out, split, header)
    if built is not None and built != list(classes):
        return (f"{out} already holds {split} shards labelled by another class list ({len(built)} classes there, "
                f"{len(classes)} now: the class folders of {TRAIN_SPLIT}/ changed, or an older build numbered "
                f"{split}/ by its own folders); {fix}")
    return (f"{out} already holds {split} shards built from a different input (files under {split}/ were added, "
            f"removed or changed since); {fix}")


def _prepare_output(out: str, split: str, digest: str, options: ShardOptions, classes: Sequence[str],
                    overwrite: bool) -> dict[str, ShardResult]:
    """Check out against this plan; return the records of shards an earlier run of the same plan completed.

    Same plan: keep its records, drop its temporaries. Another plan: refuse, unless overwrite, which
    removes this split's files (and only those) and starts a fresh plan header.
    """
    os.makedirs(out, exist_ok=True)
    header = _read_plan(out, split)
    if header is not None and header.get("plan") == digest and not overwrite:
        for p in _own_files(out, split):
            if p.endswith(".tmp"):
                os.remove(p)
        return _read_journal(_journal_path(out, split))
    if not overwrite and any(not p.endswith(".tmp") for p in _own_files(out, split)):
        raise FileExistsError(_mismatch_message(out, split, header, options, classes))
    for p in _own_files(out, split):
        os.remove(p)
    write_atomic(_plan_path(out, split), json_bytes({"format": PLAN_FORMAT, "plan": digest, "classes": list(classes),
                                                      "options": options.record()}, indent=1))
    return {}


def _check_kept(item: tuple[str, ShardResult]) -> ShardResult | None:
    """A completed shard from an earlier run, if its file is still there with the recorded sha256."""
    path, record = item
    try:
        if os.path.getsize(path) == record.bytes and file_sha256(path) == record.sha256:
            return record
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------
# Building a split


def make_manifest(listing: SplitListing, options: ShardOptions, results: Sequence[ShardResult],
                  names: dict[str, str] | None = None) -> dict:
    """The split's manifest: counts, shards with sizes and hashes, classes, options and every skipped file."""
    names = names or {}
    skipped = list(listing.skipped) + [s for r in results for s in r.skipped]
    return {
        "format": FORMAT,
        "split": listing.split,
        "num_samples": sum(r.num_samples for r in results),
        "num_classes": len(listing.classes),
        "classes": [{"index": i, "wnid": w, "name": names.get(w)} for i, w in enumerate(listing.classes)],
        "shards": [r.entry() for r in results],
        "options": options.record(),
        "skipped": [{"path": p, "reason": why} for p, why in sorted(skipped)],
        # how many images are stored re-encoded (only where an option re-encodes: older manifests stay as they were)
        **({"reencoded": sum(r.reencoded for r in results)}
           if options.max_size is not None or options.max_side is not None else {}),
    }


def build_split(listing: SplitListing, out: str, options: ShardOptions, workers: int = 1,
                names: dict[str, str] | None = None, overwrite: bool = False,
                progress: ProgressFn | None = None, pool: WorkerPool | None = None) -> BuildReport:
    """Write one split's shards into out (resuming an interrupted run of the same plan), then its manifest."""
    split = listing.split
    plans = plan_shards(listing, options)
    digest = plan_digest(listing, options)
    records = _prepare_output(out, split, digest, options, listing.classes, overwrite)
    by_name = {p.name: p for p in plans}
    tick = progress or (lambda images, nbytes: None)
    done: dict[str, ShardResult] = {}
    with contextlib.nullcontext(pool) if pool is not None else WorkerPool(workers) as workers_pool:
        candidates = [(os.path.join(out, n), r) for n, r in records.items() if n in by_name]
        for record in workers_pool.imap(_check_kept, candidates):
            if record is not None:
                done[record.name] = record
                tick(len(by_name[record.name].samples), sum(s.size for s in by_name[record.name].samples))
        kept = len(done)
        journal = _journal_path(out, split)
        _write_journal(journal, done.values())  # forget records of shards that must be written again
        log.info("%s: %d shards planned, %d kept from an earlier run", split, len(plans), kept)
        tasks = [ShardTask(p, split, listing.root, out, listing.classes, options, journal)
                 for p in plans if p.name not in done]
        for result in workers_pool.imap(write_shard, tasks):
            done[result.name] = result
            tick(len(by_name[result.name].samples), sum(s.size for s in by_name[result.name].samples))
    _write_journal(journal, done.values())
    manifest = make_manifest(listing, options, [done[p.name] for p in plans], names)
    write_atomic(os.path.join(out, f"{split}.json"), json_bytes(manifest, indent=1))
    return BuildReport(manifest, written=len(plans) - kept, kept=kept)


def build(src: str, out: str, options: ShardOptions | None = None, workers: int = 1,
          splits: Sequence[str] = DEFAULT_SPLITS, names: dict[str, str] | None = None,
          overwrite: bool = False, skip_unknown: bool = False) -> dict[str, BuildReport]:
    """Convert every split folder found under src into shards under out; one report per split."""
    options = options or ShardOptions()
    listings = list_splits(src, splits, skip_unknown)  # layout and class errors before any write
    with WorkerPool(workers) as pool:
        return {listing.split: build_split(listing, out, options, names=names, overwrite=overwrite, pool=pool)
                for listing in listings}


# ----------------------------------------------------------------------------------------------
# Reading back: manifest loader and --verify


def load_manifest(path: str | os.PathLike) -> dict:
    """Read a split's manifest and check it is one of ours, so a reader fails early with a clear sentence."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {path}; build the shards with tools/build_shards.py "
                                "or check the path.") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild it with tools/build_shards.py.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not an {FORMAT} manifest (format {found!r}); rebuild it with "
                         "tools/build_shards.py.")
    missing = [k for k in ("split", "num_samples", "num_classes", "classes", "shards", "options", "skipped")
               if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {', '.join(missing)}; rebuild it with tools/build_shards.py.")
    try:
        consistent = (sum(int(s["num_samples"]) for s in manifest["shards"]) == manifest["num_samples"]
                      and all(isinstance(s["name"], str) for s in manifest["shards"])
                      and len(manifest["classes"]) == manifest["num_classes"])
    except (KeyError, TypeError, ValueError):
        consistent = False
    if not consistent:
        raise ValueError(f"{path} contradicts itself (malformed shard entries or counts that do not add up); "
                         "rebuild it with tools/build_shards.py.")
    return manifest


class _HashingReader:
    """A read-only file object that hashes what is read, so verify reads each shard once."""

    def __init__(self, f: io.BufferedReader) -> None:
        self._f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        return data


def _check_sample(key: str, fields: dict[str, bytes], num_classes: int) -> list[str]:
    """Problems with one sample read back from a shard: fields, class index, and whether the image decodes."""
    images = [ext for ext in fields if ext in FORMAT_EXTENSIONS.values()]
    if len(images) != 1 or "cls" not in fields or "json" not in fields:
        return [f"{key}: expected one image, cls and json, found {', '.join(sorted(fields))}"]
    try:
        cls = int(fields["cls"])
        meta = json.loads(fields["json"])
    except ValueError as e:
        return [f"{key}: unreadable cls or json ({e})"]
    problems = []
    if not 0 <= cls < num_classes or meta.get("cls") != cls:
        problems.append(f"{key}: class index {cls} is out of range or disagrees with its json")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(fields[images[0]]), formats=PIL_FORMATS) as im:
                decode_image(im)
    except Exception as e:  # any decoder error means the image is unusable
        problems.append(f"{key}.{images[0]} ({meta.get('path')}) does not decode: {e}")
    return problems


def verify_shard(item: tuple[str, dict, int]) -> list[str]:
    """Problems with one shard against its manifest entry: size, sha256, sample count, and every image decodes."""
    path, entry, num_classes = item
    name = entry["name"]
    if not os.path.isfile(path):
        return [f"{name} is missing"]
    problems = []
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        problems.append(f"{name} is {size} bytes, the manifest says {entry['bytes']}")
    seen: set[str] = set()
    key, fields = None, {}

    def finish() -> None:  # one sample's members are consecutive: check it as soon as the next key starts
        if key is not None:
            problems.extend(f"{name}: {p}" for p in _check_sample(key, fields, num_classes))

    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    member_key, _, ext = member.name.partition(".")
                    if member_key != key:
                        finish()
                        if member_key in seen:
                            problems.append(f"{name}: the members of {member_key} are not consecutive")
                        key, fields = member_key, {}
                        seen.add(key)
                    data = tar.extractfile(member)
                    fields[ext] = data.read() if data else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{name} is not a readable tar file: {e}")
        finish()
        while reader.read(1 << 20):  # hash the end padding too
            pass
    if reader.sha.hexdigest() != entry["sha256"]:
        problems.append(f"{name} sha256 does not match the manifest: the file changed or is corrupt")
    if len(seen) != entry["num_samples"]:
        problems.append(f"{name} holds {len(seen)} samples, the manifest says {entry['num_samples']}")
    return problems


def verify_split(out: str, split: str, workers: int = 1,
                 progress: Callable[[int], None] | None = None) -> list[str]:
    """Re-read a built split and check every shard against its manifest; an empty list means all is well."""
    manifest = load_manifest(os.path.join(out, f"{split}.json"))
    items = [(os.path.join(out, s["name"]), s, manifest["num_classes"]) for s in manifest["shards"]]
    problems: list[str] = []
    with WorkerPool(workers) as pool:
        for found in pool.imap(verify_shard, items):
            problems += found
            if progress:
                progress(1)
    return sorted(problems)


def find_manifests(out: str, splits: Sequence[str] = DEFAULT_SPLITS) -> list[str]:
    """The splits of `splits` that have a manifest in out."""
    found = [s for s in splits if os.path.isfile(os.path.join(out, f"{s}.json"))]
    if not found:
        raise FileNotFoundError(f"{out} holds no manifest ({', '.join(s + '.json' for s in splits)}); build the "
                                "shards first or check --out.")
    return found


# ----------------------------------------------------------------------------------------------
# Class names


def load_names(path: str | os.PathLike) -> dict[str, str]:
    """Read class names: lines 'wnid name' (LOC_synset_mapping.txt) or JSON ({wnid: name} or {"0": [wnid, name]})."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FileNotFoundError(f"cannot read the names file {path} ({e}); check --names.") from None
    if text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"names file {path} is not valid JSON ({e}); fix it or use 'wnid name' lines.") from None
        pairs = data.values() if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) else \
            (data.items() if isinstance(data, dict) else data)
        try:
            return {str(w): str(n) for w, n in pairs}
        except (TypeError, ValueError):
            raise ValueError(f"names file {path} must map wnid to name ({{\"n01440764\": \"tench\"}}) or index to "
                             "[wnid, name]; fix it or use 'wnid name' lines.") from None
    names = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            if not name.strip():
                raise ValueError(f"names file {path} line {lineno} has no name after {wnid!r}; each line must "
                                 "be 'wnid name'.")
            names[wnid] = name.strip()
    return names
