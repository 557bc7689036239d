import json
import os

import pytest
from PIL import Image

from captioner.data.readers import read_dataset
from captioner.errors import DataError

pytestmark = pytest.mark.unit


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def make_tsv(root, lines=None, splits=None, images=("a.jpg", "b.jpg", "c.jpg")):
    for name in images:
        _image(root / "images" / name)
    lines = lines if lines is not None else [f"{n}\ta caption of {n} ." for n in ("a.jpg", "b.jpg", "c.jpg")]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    (root / "splits").mkdir(exist_ok=True)
    for split, names in (splits or {"train": ["a.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]}).items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_reads_the_shared_layout(tmp_path):
    data = read_dataset(make_tsv(tmp_path))
    assert data.splits == {"train": ["a.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]}
    assert data.captions["b.jpg"] == ["a caption of b.jpg ."]
    assert len(data.fingerprint()) == 16


def test_malformed_caption_line_names_file_and_line(tmp_path):
    make_tsv(tmp_path, lines=["a.jpg\tfine", "b.jpg no tab here", "c.jpg\tfine"])
    with pytest.raises(DataError, match=r"captions.tsv:2: expected 'image<TAB>caption'"):
        read_dataset(tmp_path)


def test_missing_image_is_reported_not_dropped(tmp_path):
    make_tsv(tmp_path, images=("a.jpg", "b.jpg"))
    with pytest.raises(DataError, match=r"1 captioned image\(s\) missing .* c.jpg"):
        read_dataset(tmp_path)


def test_missing_image_can_be_skipped_with_a_report(tmp_path):
    make_tsv(tmp_path, images=("a.jpg", "b.jpg", "c.jpg", "d.jpg"),
             lines=[f"{n}\tcap" for n in ("a.jpg", "b.jpg", "c.jpg", "e.jpg")],
             splits={"train": ["a.jpg", "e.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]})
    data = read_dataset(tmp_path, on_missing="skip")
    assert data.splits["train"] == ["a.jpg"] and data.missing_images == ["e.jpg"]


def test_empty_split_names_its_file(tmp_path):
    make_tsv(tmp_path, splits={"train": ["a.jpg"], "dev": [], "test": ["c.jpg"]})
    with pytest.raises(DataError, match=r"dev.txt: split 'dev' is empty"):
        read_dataset(tmp_path)


def test_split_image_without_caption(tmp_path):
    make_tsv(tmp_path, lines=["a.jpg\tx", "b.jpg\ty"])
    with pytest.raises(DataError, match=r"test.txt: 1 image\(s\) of split 'test' have no caption"):
        read_dataset(tmp_path)


def test_flickr8k_as_distributed(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _image(tmp_path / "Flicker8k_Dataset" / name)
    (tmp_path / "Flickr8k.token.txt").write_text(
        "a.jpg#0\tA dog .\na.jpg#1\tA brown dog .\nb.jpg#0\tA cat .\nc.jpg#0\tA bird .\n")
    for split, name in (("train", "a.jpg"), ("dev", "b.jpg"), ("test", "c.jpg")):
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text(name + "\n")
    data = read_dataset(tmp_path)
    assert data.captions["a.jpg"] == ["A dog .", "A brown dog ."]
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg\tno index\n")
    with pytest.raises(DataError, match=r"Flickr8k.token.txt:1: expected 'image#n<TAB>caption'"):
        read_dataset(tmp_path)


def test_coco_captions_json(tmp_path):
    def write(name, images):
        data = {"images": [{"id": i, "file_name": n} for i, n in enumerate(images)],
                "annotations": [{"image_id": i, "caption": f"caption {n}"} for i, n in enumerate(images)]}
        (tmp_path / name).write_text(json.dumps(data))

    for name in ("t1.jpg", "t2.jpg", "v1.jpg", "v2.jpg", "v3.jpg", "v4.jpg"):
        _image(tmp_path / "images" / name)
    write("captions_train2014.json", ["t1.jpg", "t2.jpg"])
    write("captions_val2014.json", ["v1.jpg", "v2.jpg", "v3.jpg", "v4.jpg"])
    data = read_dataset(tmp_path)
    assert data.splits["train"] == ["t1.jpg", "t2.jpg"]
    assert sorted(data.splits["dev"] + data.splits["test"]) == ["v1.jpg", "v2.jpg", "v3.jpg", "v4.jpg"]
    assert len(data.splits["dev"]) == 2
    (tmp_path / "captions_val2014.json").write_text('{"images": [], "annotations": [{"image_id": 9}]}')
    with pytest.raises(DataError, match="captions_val2014.json"):
        read_dataset(tmp_path)


def test_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="cannot tell the data format"):
        read_dataset(tmp_path)


def test_fingerprint_follows_captions_splits_and_images(tmp_path):
    names = ("a.jpg", "b.jpg", "c.jpg", "d.jpg")
    root = make_tsv(tmp_path, images=names, lines=[f"{n}\ta caption of {n} ." for n in names],
                    splits={"train": ["a.jpg", "d.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]})

    def fingerprint():
        return read_dataset(root).fingerprint()

    base = fingerprint()
    assert fingerprint() == base
    # Not data: the same captions written again (new mtime), a hidden upload, a file beside images/.
    captions = (root / "captions.tsv").read_text()
    (root / "captions.tsv").write_text(captions)
    (root / "images" / ".upload.jpg.tmp").write_bytes(b"partial")
    (root / "notes.txt").write_text("not data")
    assert fingerprint() == base

    (root / "captions.tsv").write_text(captions.replace("a caption of b.jpg", "a new caption of b.jpg"))
    assert fingerprint() != base
    (root / "captions.tsv").write_text(captions)
    assert fingerprint() == base

    split = (root / "splits" / "test.txt").read_text()
    (root / "splits" / "train.txt").write_text("a.jpg\n")
    (root / "splits" / "test.txt").write_text("c.jpg\nd.jpg\n")
    assert fingerprint() != base
    (root / "splits" / "train.txt").write_text("a.jpg\nd.jpg\n")
    (root / "splits" / "test.txt").write_text(split)
    assert fingerprint() == base

    image = root / "images" / "a.jpg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fingerprint() != base
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint() == base
    image.write_bytes(image.read_bytes() + b"\0")  # one more byte: same mtime would not hide it
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint() != base
    image.write_bytes(image.read_bytes()[:-1])
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint() == base

    _image(root / "images" / "e.jpg")
    assert fingerprint() != base
    (root / "images" / "e.jpg").unlink()
    assert fingerprint() == base
