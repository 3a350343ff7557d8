"""The shard builder on real photographs: round trip, determinism, resume after SIGKILL, bad input, --verify."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torchvision.datasets.folder as tv_folder
import webdataset as wds
from PIL import Image

from antismooth.cli import build_shards as tool
from antismooth.data import shards
from antismooth.data.shards import BadImage, ShardOptions, build, load_manifest, probe_image

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "build_shards.py"


def read_back(out: Path, split: str) -> list[dict]:
    """Every sample of a split, read with a plain webdataset reader in shard order."""
    manifest = load_manifest(out / f"{split}.json")
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """name -> bytes of every file in a folder (hidden plan files included)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def image_files(split_dir: Path) -> list[tuple[str, int]]:
    """torchvision's own ImageFolder listing: (relative path, class index) in its order."""
    _, class_to_idx = tv_folder.find_classes(split_dir)
    found = tv_folder.make_dataset(str(split_dir), class_to_idx, extensions=tv_folder.IMG_EXTENSIONS,
                                   allow_empty=True)
    return [(os.path.relpath(path, split_dir), cls) for path, cls in found]


def test_round_trip_is_byte_identical_with_torchvision_classes(imagefolder: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert tool.main(["--src", str(imagefolder), "--out", str(out), "--max-count", "10", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "train: wrote 103 images in 11 shards" in printed and "skipped 0 files" in printed

    modes, formats = set(), set()
    for split in ("train", "val"):
        manifest = load_manifest(out / f"{split}.json")
        classes, _ = tv_folder.find_classes(imagefolder / split)
        assert [c["wnid"] for c in manifest["classes"]] == classes  # val's empty folders count too
        assert manifest["num_classes"] == 103
        expected = image_files(imagefolder / split)
        samples = read_back(out, split)
        assert len(samples) == manifest["num_samples"] == len(expected)
        for sample in samples:
            meta = json.loads(sample["json"])
            n = [p for p, _ in expected].index(meta["path"])
            assert sample["__key__"] == f"{split}_{n:08d}" and "." not in sample["__key__"]
            ext = "png" if "png" in sample else "jpg"  # the PNG named .JPEG is stored as what it is
            assert sample[ext] == (imagefolder / split / meta["path"]).read_bytes()
            assert int(sample["cls"]) == meta["cls"] == expected[n][1]
            assert meta["wnid"] == classes[expected[n][1]]
            with Image.open(io.BytesIO(sample[ext])) as im:
                modes.add(im.mode)
                formats.add((ext, im.format))
        order = [json.loads(s["json"])["cls"] for s in samples]
        assert order != sorted(order), "samples must be shuffled across shards, not class-sorted"

        for entry in manifest["shards"]:
            path = out / entry["name"]
            assert path.stat().st_size == entry["bytes"] and shards.file_sha256(str(path)) == entry["sha256"]
            assert entry["num_samples"] <= 10
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
                names = tar.getnames()
                keys = dict.fromkeys(n.split(".")[0] for n in names)
                assert names == [f"{k}.{ext}" for k in keys
                                 for ext in sorted(("cls", "png" if f"{k}.png" in names else "jpg", "json"))]
    assert "L" in modes and "CMYK" in modes  # the grayscale and CMYK JPEGs are kept as they are
    assert formats == {("jpg", "JPEG"), ("png", "PNG")}


def test_output_is_identical_for_any_worker_count_and_follows_the_seed(imagefolder: Path, tmp_path: Path):
    options = ShardOptions(max_count=7)
    build(str(imagefolder), str(tmp_path / "w1"), options, workers=1)
    build(str(imagefolder), str(tmp_path / "w2"), options, workers=2)
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")

    def assignment(out: Path) -> list[list[str]]:
        return [[json.loads(s["json"])["path"] for s in wds.WebDataset(str(out / e["name"]), shardshuffle=False,
                                                                       empty_check=False)]
                for e in load_manifest(out / "train.json")["shards"]]

    build(str(imagefolder), str(tmp_path / "seed1"), ShardOptions(max_count=7, seed=1), workers=2)
    assert assignment(tmp_path / "seed1") != assignment(tmp_path / "w1")


def test_shards_respect_count_and_size_limits(imagefolder: Path, tmp_path: Path):
    # About four images' worth of bytes: a shard of 6 is usually over it, so the byte limit cuts before the count.
    limit = round(4 * statistics.mean(p.stat().st_size for p in (imagefolder / "train").glob("*/*")))
    options = ShardOptions(max_count=6, max_size_mb=limit / 1_000_000)
    report = build(str(imagefolder), str(tmp_path / "out"), options, workers=2)["train"]
    entries = report.manifest["shards"]
    assert sum(e["num_samples"] for e in entries) == 103
    assert all(e["num_samples"] <= 6 for e in entries)
    assert all(e["bytes"] <= limit or e["num_samples"] == 1 for e in entries)
    assert any(e["num_samples"] < 6 for e in entries[:-1])  # the byte limit did cut some shards


def test_resume_after_sigkill_gives_the_same_bytes(imagefolder: Path, tmp_path: Path, capsys):
    for image in list((imagefolder / "train").glob("*/*")):  # 515 train images: the build takes a while
        for k in range(4):
            os.link(image, image.with_name(f"copy{k}_{image.name}"))
    out, reference = tmp_path / "out", tmp_path / "reference"
    args = ["--src", str(imagefolder), "--max-count", "2", "--decode-check"]
    proc = subprocess.Popen([sys.executable, str(TOOL), *args, "--out", str(out), "--workers", "2"], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("train-*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the builder and its pool workers
        proc.wait()
    complete = {p.name: p.stat().st_ino for p in out.glob("train-*.tar")}
    assert complete, "the build never wrote a shard"
    assert not (out / "train.json").exists(), "the build finished before it could be killed"

    assert tool.main([*args, "--out", str(out), "--workers", "2"]) == 0
    assert "shards kept from an earlier run" in capsys.readouterr().out
    assert tool.main([*args, "--out", str(reference), "--workers", "1"]) == 0
    assert folder_bytes(out) == folder_bytes(reference)
    assert {n: (out / n).stat().st_ino for n in complete} == complete  # complete shards were kept, not rewritten
    assert not list(out.glob("*.tmp"))


def _make_bad_inputs(train: Path, sample_jpeg: bytes) -> tuple[dict[str, str], list[str]]:
    """Add every kind of bad and odd input to an ImageFolder train/; (skipped path -> reason word, kept paths)."""
    first, second, third = sorted(p.name for p in train.iterdir())[:3]
    (train / "a000_empty").mkdir()  # sorts first: every index shifts, as in torchvision
    (train / "notes.txt").write_text("not a class folder")
    (train / first / "zero.JPEG").write_bytes(b"")
    (train / first / "truncated.JPEG").write_bytes(sample_jpeg[: len(sample_jpeg) // 2])
    (train / first / "noise.JPEG").write_bytes(bytes(range(256)) * 64)
    (train / first / "README.txt").write_text("class notes")
    (train / second / "dangling.JPEG").symlink_to(train / "no-such-file.JPEG")
    (train / second / "loop").symlink_to("..", target_is_directory=True)
    (train / second / "self").symlink_to(".", target_is_directory=True)
    (train / second / "ping.JPEG").symlink_to("pong.JPEG")
    (train / second / "pong.JPEG").symlink_to("ping.JPEG")
    os.mkfifo(train / second / "pipe.JPEG")
    skipped = {
        "notes.txt": "class folder", f"{first}/zero.JPEG": "empty", f"{first}/truncated.JPEG": "truncated",
        f"{first}/noise.JPEG": "not an image", f"{first}/README.txt": "not an image",
        f"{second}/dangling.JPEG": "dangling", f"{second}/loop": "loop", f"{second}/self": "loop",
        f"{second}/ping.JPEG": "loop", f"{second}/pong.JPEG": "loop", f"{second}/pipe.JPEG": "regular file",
    }
    if os.geteuid() != 0:  # root reads through chmod 000: there the dangling symlink stands for "unreadable"
        (train / second / "locked.JPEG").write_bytes(sample_jpeg)
        (train / second / "locked.JPEG").chmod(0)
        (train / second / "locked_dir").mkdir()
        (train / second / "locked_dir").chmod(0)
        skipped[f"{second}/locked.JPEG"] = "unreadable"
        skipped[f"{second}/locked_dir"] = "unreadable"

    odd = ["with space.JPEG", "it's \"quoted\".JPEG", "ünïcödé 日本.JPEG", "new\nline.JPEG",
           os.fsdecode(b"bytes\xff\xfename.JPEG")]
    for name in odd:
        (train / third / name).write_bytes(sample_jpeg)
    image = Image.open(io.BytesIO(sample_jpeg))
    png, cmyk = io.BytesIO(), io.BytesIO()
    image.save(png, "PNG")
    image.convert("CMYK").save(cmyk, "JPEG")
    (train / third / "png_named.JPEG").write_bytes(png.getvalue())
    (train / third / "cmyk.JPEG").write_bytes(cmyk.getvalue())
    kept = [f"{third}/{name}" for name in odd + ["png_named.JPEG", "cmyk.JPEG"]]
    return skipped, kept


def test_bad_input_is_listed_and_skipped_never_fatal(imagefolder: Path, tmp_path: Path, capsys):
    train = imagefolder / "train"
    sample_jpeg = sorted(train.glob("*/*.JPEG"))[0].read_bytes()  # c000's: a baseline RGB JPEG
    skipped, kept = _make_bad_inputs(train, sample_jpeg)
    out = tmp_path / "out"
    assert tool.main(["--src", str(imagefolder), "--out", str(out), "--splits", "train", "--max-count", "16"]) == 0
    assert f"train: wrote {103 + len(kept)} images" in capsys.readouterr().out
    manifest = load_manifest(out / "train.json")
    listed = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(listed) == set(skipped)
    for path, word in skipped.items():
        assert word in listed[path], (path, listed[path])

    classes, class_to_idx = tv_folder.find_classes(train)
    assert [c["wnid"] for c in manifest["classes"]] == classes and classes[0] == "a000_empty"
    samples = {json.loads(s["json"])["path"]: s for s in read_back(out, "train")}
    assert len(samples) == manifest["num_samples"] == 103 + len(kept)
    for path in kept:
        sample = samples[path]
        ext = "png" if path.endswith("png_named.JPEG") else "jpg"
        assert sample[ext] == (train / path).read_bytes()  # stored as they are, CMYK included
        assert int(sample["cls"]) == class_to_idx[path.split("/")[0]]
    assert Image.open(io.BytesIO(samples[kept[-1]]["jpg"])).mode == "CMYK"


def test_structural_check_catches_every_truncation(sample_images: Path):
    for path in sorted((sample_images / "train").glob("*/*")):
        data = path.read_bytes()
        png = data.startswith(b"\x89PNG\r\n\x1a\n")  # the one PNG named .JPEG
        assert probe_image(data)[0] == ("png" if png else "jpg")
        # A PNG cut into its IEND chunk (PIL's verify stops at IEND: its 4 CRC bytes cut go unseen), mid-file, early.
        cuts = (len(data) - 5, len(data) // 2, 100) if png else (len(data) - 2, len(data) // 2,
                                                                  data.find(b"\xff\xda") + 4, 100)
        for cut in cuts:
            with pytest.raises(BadImage):
                probe_image(data[:cut])


def test_verify_passes_then_catches_a_flipped_byte(imagefolder: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    build(str(imagefolder), str(out), ShardOptions(max_count=20), workers=2)
    assert tool.main(["--out", str(out), "--verify"]) == 0
    assert "train: verified 6 shards, 103 images: OK" in capsys.readouterr().out

    shard = out / "train-000002.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert tool.main(["--out", str(out), "--verify"]) == 1
    printed = capsys.readouterr().out
    assert "train: train-000002.tar sha256 does not match the manifest" in printed
    assert "train: verified 6 shards, 103 images: 1 problem(s)" in printed


def test_verify_decodes_every_image(tmp_path: Path, sample_images: Path):
    jpeg = sorted((sample_images / "train").glob("*/*"))[0].read_bytes()  # c000's: a baseline RGB JPEG
    shard = tmp_path / "train-000000.tar"
    with open(shard, "wb") as f, wds.TarWriter(f, encoder=False) as tar:
        tar.write({"__key__": "train_00000000", "jpg": jpeg, "cls": b"0", "json": b'{"cls": 0}'})
        tar.write({"__key__": "train_00000001", "jpg": jpeg[:5000], "cls": b"0", "json": b'{"cls": 0}'})
    entry = {"name": shard.name, "num_samples": 2, "bytes": shard.stat().st_size,
             "sha256": shards.file_sha256(str(shard))}
    problems = shards.verify_shard((str(shard), entry, 1))
    assert len(problems) == 1 and "train_00000001.jpg" in problems[0] and "does not decode" in problems[0]


def test_rerun_keeps_matching_output_and_refuses_other_options(imagefolder: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    args = ["--src", str(imagefolder), "--out", str(out), "--max-count", "20"]
    assert tool.main(args) == 0
    before = folder_bytes(out)
    assert tool.main(args) == 0
    assert "6 shards kept from an earlier run" in capsys.readouterr().out
    assert folder_bytes(out) == before

    assert tool.main([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "built with other options (seed=0 there, 1 now)" in err and "--overwrite" in err
    assert folder_bytes(out) == before

    assert tool.main([*args, "--seed", "1", "--max-count", "50", "--overwrite"]) == 0
    manifest = load_manifest(out / "train.json")
    assert manifest["options"]["seed"] == 1 and len(manifest["shards"]) == 3
    assert sorted(p.name for p in out.glob("train-*")) == [s["name"] for s in manifest["shards"]]


def test_max_size_reencodes_large_images(imagefolder: Path, tmp_path: Path):
    out = tmp_path / "out"
    build(str(imagefolder), str(out), ShardOptions(max_count=50, max_size=64, quality=80), splits=["val"])
    samples = read_back(out, "val")
    assert len(samples) == 26
    for sample in samples:
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and min(image.size) == 64
        assert len(sample["jpg"]) < (imagefolder / "val" / json.loads(sample["json"])["path"]).stat().st_size


def test_max_side_stores_large_images_at_that_longer_side_recorded_and_resumable(imagefolder: Path, tmp_path: Path,
                                                                                capsys):
    """--max-side 320 (FFCV's max_resolution): every image whose longer side exceeds 320 is a JPEG of exactly that
    longer side at --max-side-quality, the others byte for byte; the manifest says so; the bytes do not depend on
    the worker count, and a rerun keeps them while another --max-side is refused."""
    out = tmp_path / "out"
    args = ["--src", str(imagefolder), "--out", str(out), "--max-count", "20", "--splits", "train",
            "--max-side", "320", "--max-side-quality", "85"]
    assert tool.main([*args, "--workers", "2"]) == 0
    assert "re-encoded smaller" in capsys.readouterr().out
    manifest = load_manifest(out / "train.json")
    assert manifest["options"]["max_side"] == 320 and manifest["options"]["max_side_quality"] == 85
    large = 0
    for sample in read_back(out, "train"):
        original = (imagefolder / "train" / json.loads(sample["json"])["path"]).read_bytes()
        ext = "jpg" if "jpg" in sample else "png"
        with Image.open(io.BytesIO(original)) as source:
            size = source.size
        with Image.open(io.BytesIO(sample[ext])) as stored:
            if max(size) > 320:
                large += 1
                assert ext == "jpg" and stored.format == "JPEG" and max(stored.size) == 320
                assert abs(stored.size[0] / stored.size[1] - size[0] / size[1]) < 0.02   # aspect ratio kept
                assert len(sample[ext]) < len(original)
            else:
                assert sample[ext] == original and stored.size == size
    assert large == manifest["reencoded"] and 30 < large < 103   # the sample images run 120-666 px a side
    again = tmp_path / "again"
    assert tool.main([*args, "--out", str(again), "--workers", "1"]) == 0
    assert folder_bytes(again) == folder_bytes(out)
    before = folder_bytes(out)
    assert tool.main(args) == 0 and "6 shards kept" in capsys.readouterr().out and folder_bytes(out) == before
    assert tool.main([*args[:-4], "--max-side", "256"]) == 2
    assert "max_side=320 there, 256 now" in capsys.readouterr().err


def test_builds_without_max_side_record_the_options_of_earlier_builds(imagefolder: Path, tmp_path: Path):
    """The new options are recorded (and hashed into the plan) only when set: a build made before they existed
    resumes as the same plan."""
    options = ShardOptions(max_count=50)
    manifest = build(str(imagefolder), str(tmp_path / "out"), options, splits=["val"])["val"].manifest
    assert "max_side" not in manifest["options"] and "reencoded" not in manifest
    assert set(manifest["options"]) == {"seed", "max_count", "max_size_mb", "max_size", "quality", "decode_check"}
    assert shards.ShardOptions(max_count=50, max_side=400).record()["max_side"] == 400


def test_names_file_in_either_form(imagefolder: Path, tmp_path: Path):
    wnids = sorted(p.name for p in (imagefolder / "val").iterdir())
    lines = tmp_path / "names.txt"
    lines.write_text(f"{wnids[0]} tench, Tinca tinca\n{wnids[1]} goldfish\n")
    keras = tmp_path / "names.json"
    keras.write_text(json.dumps({"0": [wnids[0], "tench"], "1": [wnids[1], "goldfish"]}))
    for names_file, first in ((lines, "tench, Tinca tinca"), (keras, "tench")):
        out = tmp_path / names_file.stem
        assert tool.main(["--src", str(imagefolder), "--out", str(out), "--splits", "val",
                          "--names", str(names_file)]) == 0
        classes = load_manifest(out / "val.json")["classes"]
        assert [c["name"] for c in classes[:3]] == [first, "goldfish", None]


def test_load_manifest_errors_are_one_clear_sentence(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no shard manifest at .*build the shards"):
        load_manifest(tmp_path / "train.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_manifest(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not an antismooth-shards/1 manifest"):
        load_manifest(tmp_path / "other.json")


def test_user_errors_exit_2_with_one_line(tmp_path: Path, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.JPEG").write_bytes(b"x")
    for argv, words in ((["--src", str(tmp_path / "missing")], "does not exist"),
                        (["--src", str(tmp_path / "flat")], "holds none of the split folders"),
                        (["--out", str(tmp_path), "--verify"], "holds no manifest"),
                        (["--src", str(tmp_path), "--max-count", "0"], "--max-count must be at least 1")):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1


# --- labels across splits: every split's cls is the training split's index of its class ----------------------

def _val_of_classes(imagefolder: Path, classes: list[str]) -> None:
    """Replace val/ by the train images of `classes` only (each folder holds its image)."""
    shutil.rmtree(imagefolder / "val")
    for wnid in classes:
        shutil.copytree(imagefolder / "train" / wnid, imagefolder / "val" / wnid)


def _labels(out: Path, split: str) -> dict[str, int]:
    """Each sample's class folder -> its cls, checked against its json and the manifest's class list."""
    classes = [c["wnid"] for c in load_manifest(out / f"{split}.json")["classes"]]
    labels = {}
    for sample in read_back(out, split):
        meta = json.loads(sample["json"])
        folder = meta["path"].split("/")[0]
        assert int(sample["cls"]) == meta["cls"] and classes[meta["cls"]] == meta["wnid"] == folder
        labels[folder] = meta["cls"]
    return labels


def test_val_with_a_fifth_of_the_classes_gets_train_indices(imagefolder: Path, tmp_path: Path, capsys):
    train_classes = sorted(p.name for p in (imagefolder / "train").iterdir())
    fifth = train_classes[::5]
    _val_of_classes(imagefolder, fifth)
    out = tmp_path / "out"
    assert tool.main(["--src", str(imagefolder), "--out", str(out), "--max-count", "10"]) == 0
    manifest = load_manifest(out / "val.json")
    assert [c["wnid"] for c in manifest["classes"]] == train_classes and manifest["num_classes"] == 103
    assert _labels(out, "val") == {wnid: train_classes.index(wnid) for wnid in fifth}
    assert sorted(_labels(out, "val").values()) == list(range(0, 103, 5))  # not val's own 0..20
    assert tool.main(["--out", str(out), "--verify"]) == 0
    assert "val: verified 3 shards, 21 images: OK" in capsys.readouterr().out

    # Built alone, val/ still takes train/'s labels; with no train/ at all, its own folders number them.
    build(str(imagefolder), str(tmp_path / "alone"), ShardOptions(max_count=10), splits=["val"])
    assert _labels(tmp_path / "alone", "val") == _labels(out, "val")
    shutil.rmtree(imagefolder / "train")
    build(str(imagefolder), str(tmp_path / "no-train"), ShardOptions(max_count=10), splits=["val"])
    assert _labels(tmp_path / "no-train", "val") == {wnid: i for i, wnid in enumerate(fifth)}


def test_a_val_class_train_lacks_is_refused_or_skipped(imagefolder: Path, tmp_path: Path, capsys):
    stray = imagefolder / "val" / "n99999999"
    shutil.copytree(next(p for p in (imagefolder / "val").iterdir() if any(p.iterdir())), stray)
    out = tmp_path / "out"
    args = ["--src", str(imagefolder), "--out", str(out), "--max-count", "10"]
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: val/ has 1 class folder(s) that train/ does not have (n99999999)")
    assert "--skip-unknown-classes" in err and err.count("\n") == 1
    assert not out.exists()  # refused while listing: not even train was written

    assert tool.main([*args, "--skip-unknown-classes"]) == 0
    manifest = load_manifest(out / "val.json")
    assert {"path": "n99999999", "reason": shards.UNKNOWN_CLASS_REASON} in manifest["skipped"]
    assert manifest["num_samples"] == 26 and "n99999999" not in _labels(out, "val")
    assert [c["wnid"] for c in manifest["classes"]] == tv_folder.find_classes(imagefolder / "train")[0]


def test_resume_refuses_shards_labelled_by_another_class_list(imagefolder: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    args = ["--src", str(imagefolder), "--out", str(out), "--splits", "val"]
    assert tool.main(args) == 0
    plan = out / ".plan-val.json"
    header = json.loads(plan.read_text())
    assert header["classes"] == tv_folder.find_classes(imagefolder / "train")[0]
    del header["classes"]  # as an older build wrote it: the manifest's class list stands in
    plan.write_text(json.dumps(header))
    assert tool.main(args) == 0 and "kept from an earlier run" in capsys.readouterr().out
    before = folder_bytes(out)

    (imagefolder / "train" / "a000_new").mkdir()  # sorts first: every train index shifts by one
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert "val shards labelled by another class list (103 classes there, 104 now" in err and "--overwrite" in err
    assert folder_bytes(out) == before
    labels = _labels(out, "val")
    assert tool.main([*args, "--overwrite"]) == 0
    assert _labels(out, "val") == {wnid: cls + 1 for wnid, cls in labels.items()}
