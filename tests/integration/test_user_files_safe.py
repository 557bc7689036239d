"""No command deletes or rewrites a file the project did not create (issue #7).

Every place that removes, renames over or rewrites files (``rmtree``, ``os.replace``, ``rename``,
``unlink``, overwrites) is reached here from a command with a user's sentinel file in the way; the
sentinel must survive byte for byte. Where a command must refuse, it does so with a one-line error
that names the folder, before anything is written.
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from captioner.cli import main

pytestmark = pytest.mark.integration

SMALL = ["--set", "data.synthetic.num_train=6", "--set", "data.synthetic.num_dev=2",
         "--set", "data.synthetic.num_test=2", "--set", "data.synthetic.image_size=32"]


def _sentinel(folder: Path, name: str = "notes.txt") -> tuple[Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(64) + b"\nthe user's own file\n"
    (folder / name).write_bytes(data)
    return folder / name, data


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a digest of its bytes (and every folder), to compare before/after."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def _fails(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


# -- synthetic data: data.root is a user's folder -------------------------------------------------
@pytest.mark.parametrize("command", [
    ["tokenize", "--output", "{tmp}/vocab"],
    ["extract", "--quiet"],
    ["train", "--config", "smoke", "--output", "{tmp}/run", "--quiet"],
])
def test_synthetic_preset_never_replaces_a_users_data_root(tmp_path, capsys, command):
    """A user who forgot --config flickr8k: the synthetic generator must not replace their data."""
    data = tmp_path / "MY_DATA"
    sentinel, content = _sentinel(data / "images", "photo.jpg")
    before = _tree(data)
    argv = [part.format(tmp=tmp_path) for part in command] + ["--set", f"data.root={data}", *SMALL]
    err = _fails(capsys, argv)
    assert str(data) in err and "--config flickr8k" in err
    assert sentinel.read_bytes() == content and _tree(data) == before
    assert not (tmp_path / "run" / "saved_model").exists() and not (tmp_path / "vocab" / "vocab.json").exists()


def test_pipeline_run_never_replaces_a_users_data_root(tmp_path, capsys):
    data = tmp_path / "MY_DATA"
    sentinel, content = _sentinel(data)
    root_sentinel, root_content = _sentinel(tmp_path / "pipeline-root")
    code = main(["pipeline", "run", "--local", "--config", "smoke", "--set", f"data.root={data}",
                 "--pipeline-root", str(tmp_path / "pipeline-root"), "--model-repo", str(tmp_path / "models")])
    assert code != 0
    assert sentinel.read_bytes() == content and sorted(p.name for p in data.iterdir()) == ["notes.txt"]
    assert root_sentinel.read_bytes() == root_content


def test_synthetic_generation_replaces_only_its_own_data(tmp_path):
    from captioner.config import SyntheticConfig
    from captioner.data.synthetic import generate
    from captioner.errors import DataError

    small = SyntheticConfig(num_train=4, num_dev=2, num_test=2, image_size=32, seed=1)
    other = SyntheticConfig(num_train=5, num_dev=2, num_test=2, image_size=32, seed=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate(empty, small) / "captions.tsv").is_file()  # an empty folder is fine
    generate(empty, other)  # our own data set with other parameters: replaced
    assert len((empty / "splits" / "train.txt").read_text().split()) == 5
    # Our data set with a user's file added: not ours alone any more, so not replaced.
    sentinel, content = _sentinel(empty)
    with pytest.raises(DataError, match="--config flickr8k"):
        generate(empty, small)
    assert sentinel.read_bytes() == content and len((empty / "splits" / "train.txt").read_text().split()) == 5
    # A user's file where the folder should be.
    (tmp_path / "a_file").write_bytes(b"mine")
    with pytest.raises(DataError):
        generate(tmp_path / "a_file", small)
    assert (tmp_path / "a_file").read_bytes() == b"mine"


@pytest.mark.parametrize("where", ["images/my_holiday.jpg", "splits/my_notes.txt", "splits/old/train.txt"])
def test_synthetic_regeneration_keeps_a_users_file_inside_its_subfolders(tmp_path, where):
    """Replacing the data set removes its whole tree, so a user's file in images/ or splits/ (at any
    depth) makes the folder not ours: regenerating with other parameters is refused, nothing moves."""
    from captioner.config import SyntheticConfig
    from captioner.data.synthetic import generate
    from captioner.errors import DataError

    root = tmp_path / "synthetic"
    generate(root, SyntheticConfig(num_train=4, num_dev=2, num_test=2, image_size=32, seed=1))
    sentinel, content = _sentinel(root / Path(where).parent, Path(where).name)
    before = _tree(root)
    with pytest.raises(DataError, match="not a synthetic data set this project made") as info:
        generate(root, SyntheticConfig(num_train=5, num_dev=2, num_test=2, image_size=32, seed=1))
    assert str(root) in str(info.value)
    assert sentinel.read_bytes() == content and _tree(root) == before


def test_synthetic_data_set_with_a_symlink_inside_is_not_ours(tmp_path):
    from captioner.config import SyntheticConfig
    from captioner.data.synthetic import generate
    from captioner.errors import DataError

    root = tmp_path / "synthetic"
    generate(root, SyntheticConfig(num_train=4, num_dev=2, num_test=2, image_size=32, seed=1))
    sentinel, content = _sentinel(tmp_path / "elsewhere", "train_00000.png")
    (root / "images" / "train_00000.png").unlink()
    (root / "images" / "train_00000.png").symlink_to(sentinel)
    with pytest.raises(DataError):
        generate(root, SyntheticConfig(num_train=5, num_dev=2, num_test=2, image_size=32, seed=1))
    assert (root / "images" / "train_00000.png").is_symlink() and sentinel.read_bytes() == content


# -- export ------------------------------------------------------------------------------------
@pytest.fixture()
def run_copy(smoke_run, tmp_path):
    out, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy


def test_export_into_the_run_folder_deletes_nothing(run_copy, capsys):
    before = _tree(run_copy)
    err = _fails(capsys, ["export", "--model", str(run_copy), "--output", str(run_copy)])
    assert str(run_copy) in err and "not written by captioner" in err
    assert _tree(run_copy) == before


def test_export_refuses_a_users_folder(run_copy, tmp_path, capsys):
    sentinel, content = _sentinel(tmp_path / "mine")
    err = _fails(capsys, ["export", "--model", str(run_copy), "--output", str(tmp_path / "mine")])
    assert str(tmp_path / "mine") in err
    assert sentinel.read_bytes() == content and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # Our own export with a user's file put inside it is not ours alone: refused too.
    inside, inside_content = _sentinel(run_copy / "saved_model", "README.md")
    before = _tree(run_copy / "saved_model")
    _fails(capsys, ["export", "--model", str(run_copy), "--output", str(run_copy / "saved_model")])
    assert inside.read_bytes() == inside_content and _tree(run_copy / "saved_model") == before


@pytest.mark.parametrize("where", ["assets.extra/my_notes.txt", "variables/my_backup.index",
                                   "assets/mine/vocab.txt", "my_folder/notes.txt"])
def test_reexport_keeps_a_users_file_inside_our_export(run_copy, capsys, where):
    """A user's file anywhere inside our export (not only beside saved_model.pb) makes it not ours:
    the export that would remove the whole tree is refused, and every byte stays."""
    target = run_copy / "saved_model"
    sentinel, content = _sentinel(target / Path(where).parent, Path(where).name)
    before = _tree(target)
    err = _fails(capsys, ["export", "--model", str(run_copy), "--output", str(target)])
    assert str(target) in err and "not written by captioner" in err
    assert sentinel.read_bytes() == content and _tree(target) == before


def test_reexport_replaces_only_our_export(run_copy, capsys):
    """Replacing our own export: the old one is moved aside into a folder of our own, so a user's
    folder with the name the old code used for that (".saved_model.old") is not touched."""
    target = run_copy / "saved_model"
    old_pb = (target / "saved_model.pb").stat().st_mtime_ns
    sentinel, content = _sentinel(run_copy / ".saved_model.old")
    beside, beside_content = _sentinel(run_copy, "my-notes.txt")
    assert main(["export", "--model", str(run_copy), "--output", str(target)]) == 0, capsys.readouterr().err
    assert (target / "saved_model.pb").stat().st_mtime_ns != old_pb
    assert sentinel.read_bytes() == content and beside.read_bytes() == beside_content
    leftovers = [p.name for p in run_copy.iterdir()
                 if p.name.startswith(".saved_model.") and p.name != ".saved_model.old"]
    assert not leftovers, leftovers


# -- train, tokenize, extract, evaluate outputs ---------------------------------------------------
def test_train_refuses_an_unrelated_non_empty_output(tmp_path, capsys):
    sentinel, content = _sentinel(tmp_path / "mine")
    (tmp_path / "mine" / "metrics.csv").write_text("epoch,loss\n1,0.5\n")  # a user's file with our name
    before = _tree(tmp_path / "mine")
    for extra in ([], ["--restart"]):
        err = _fails(capsys, ["train", "--config", "smoke", "--output", str(tmp_path / "mine"), "--quiet", *extra])
        assert str(tmp_path / "mine") in err and "no captioner run" in err
        assert _tree(tmp_path / "mine") == before and sentinel.read_bytes() == content


def test_tokenize_never_overwrites_a_users_vocabulary(tmp_path, capsys):
    sentinel, content = _sentinel(tmp_path / "out", "vocab.txt")
    err = _fails(capsys, ["tokenize", "--output", str(tmp_path / "out"), *SMALL])
    assert "vocab.txt" in err
    assert sentinel.read_bytes() == content and [p.name for p in (tmp_path / "out").iterdir()] == ["vocab.txt"]
    # Beside a user's other files, tokenize writes its own two and leaves the rest alone; rerunning
    # it replaces only what it wrote.
    other, other_content = _sentinel(tmp_path / "out2")
    for _ in range(2):
        assert main(["tokenize", "--output", str(tmp_path / "out2"), *SMALL]) == 0
    assert other.read_bytes() == other_content
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["notes.txt", "vocab.json", "vocab.txt"]


def test_extract_refuses_a_users_folder_as_cache(tmp_path, capsys):
    sentinel, content = _sentinel(tmp_path / "mine", "index.json")
    err = _fails(capsys, ["extract", "--quiet", "--cache", str(tmp_path / "mine"), *SMALL])
    assert str(tmp_path / "mine") in err
    assert sentinel.read_bytes() == content and [p.name for p in (tmp_path / "mine").iterdir()] == ["index.json"]


def test_extract_into_its_own_cache_leaves_a_users_file_alone(tmp_path, capsys):
    """Shards, index and hashes are rewritten in a feature cache; a user's file beside them is not."""
    cache = tmp_path / "cache"
    assert main(["extract", "--quiet", "--cache", str(cache), *SMALL]) == 0, capsys.readouterr().err
    sentinel, content = _sentinel(cache)
    more = [arg.replace("num_train=6", "num_train=9") for arg in SMALL]
    assert main(["extract", "--quiet", "--cache", str(cache), "--set", f"data.root={tmp_path / 'more'}",
                 *more]) == 0, capsys.readouterr().err
    assert sentinel.read_bytes() == content


def test_evaluate_never_overwrites_a_users_file(run_copy, tmp_path, capsys):
    sentinel, content = _sentinel(tmp_path, "results.json")
    err = _fails(capsys, ["evaluate", "--model", str(run_copy), "--output", str(sentinel)])
    assert str(sentinel) in err
    assert sentinel.read_bytes() == content


# -- the model repository (registry helper's code, reached from `pipeline run` and the Python API) --
def test_publish_never_removes_a_users_folder_in_the_repository(smoke_run, tmp_path):
    from captioner.registry import ModelRepository

    out, _ = smoke_run
    repo = tmp_path / "models"
    top, top_content = _sentinel(repo, "README.txt")
    # The staging folder used to have a fixed name derived from the process id, cleared first.
    staged, staged_content = _sentinel(repo / "captioner" / f".1.partial-{os.getpid()}")
    assert ModelRepository(repo).publish("captioner", out / "saved_model", {"metrics": {"bleu4": 0.3}}) == 1
    assert top.read_bytes() == top_content and staged.read_bytes() == staged_content
    assert (repo / "captioner" / "1" / "saved_model.pb").is_file()


def test_extract_refuses_its_cache_after_the_backbone_set_up_changed(tmp_path, capsys):
    """An explicit --cache reused after features.image_size changed would hand out stale features."""
    cache = tmp_path / "cache"
    assert main(["extract", "--quiet", "--cache", str(cache), *SMALL]) == 0, capsys.readouterr().err
    before = _tree(cache)
    err = _fails(capsys, ["extract", "--quiet", "--cache", str(cache), "--set", "features.image_size=64", *SMALL])
    assert str(cache) in err and "image_size" in err
    assert _tree(cache) == before
