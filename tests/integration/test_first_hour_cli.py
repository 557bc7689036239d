"""Issue #10, driven as a new user drives the CLI: `--model` takes any folder that names a model,
one bad image does not spoil a batch, and `data samples` says where the demo's images are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.registry import ModelRepository, RegistryError, resolve_model
from captioner.workflow import load_data


class Result:
    def __init__(self, capsys, argv: list[str]):
        try:
            self.exit_code = main(argv)  # the console script's entry point
        except SystemExit as exc:
            self.exit_code = exc.code
        self.stdout, self.stderr = capsys.readouterr()
        self.output = self.stdout + self.stderr


@pytest.fixture(scope="module")
def two_versions(smoke_run, tmp_path_factory):
    """A repository with versions 1 and 2 of the smoke model, registered from its run folder."""
    out, _ = smoke_run
    root = tmp_path_factory.mktemp("first-hour-repo")
    repository = ModelRepository(root)
    for _ in range(2):
        repository.publish("captioner", out / "saved_model", {"source_model": str(out)})
    return root


def test_model_folders_resolve_to_the_stable_else_the_newest_version(smoke_run, two_versions, tmp_path):
    out, _ = smoke_run
    repo = tmp_path / "repo"
    shutil.copytree(two_versions, repo)
    newest = resolve_model(repo)
    assert newest.path == repo / "captioner" / "2" and newest.version == 2
    assert "version 2" in newest.description and "none is labelled stable" in newest.description
    ModelRepository(repo).set_label("captioner", "stable", 1)
    for named in (repo, repo / "captioner"):
        stable = resolve_model(named)
        assert stable.path == repo / "captioner" / "1" and "labelled stable" in stable.description
    assert resolve_model(repo / "captioner" / "2").path == repo / "captioner" / "2"
    assert resolve_model(out).path == out / "saved_model"
    assert resolve_model(out / "saved_model").path == out / "saved_model"
    # evaluate and export need the trained model: a run folder, or the one a version was registered from.
    assert resolve_model(out, "trained").path == out
    assert resolve_model(repo, "trained").path == out
    assert resolve_model(out / "saved_model", "trained").path == out
    # A second model makes the repository ambiguous: the error says which to name.
    shutil.copytree(repo / "captioner", repo / "other")
    with pytest.raises(RegistryError, match="several models"):
        resolve_model(repo)


def test_caption_names_the_folder_and_what_it_looked_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    result = Result(capsys, ["caption", "--model", str(tmp_path / "empty"), str(tmp_path / "a.png")])
    assert result.exit_code == 2 and result.stdout == ""
    assert str(tmp_path / "empty") in result.stderr
    assert "looked for" in result.stderr and "model repository" in result.stderr
    result = Result(capsys, ["caption", "--model", str(tmp_path / "nowhere"), str(tmp_path / "a.png")])
    assert result.exit_code == 2 and f"{tmp_path / 'nowhere'}: no such folder" in result.stderr
    ModelRepository(tmp_path / "repo").write_models_config()
    result = Result(capsys, ["caption", "--model", str(tmp_path / "repo"), str(tmp_path / "a.png")])
    assert result.exit_code == 2 and "a model repository without any complete version" in result.stderr


def test_caption_a_folder_with_a_bad_file_from_a_repository(smoke_run, two_versions, tmp_path, capsys):
    """`--model REPO` captions with the stable version; a folder argument captions its images; a bad
    file and a missing one are named with their reasons while the good ones are captioned; exit 1."""
    _, cfg = smoke_run
    repo = tmp_path / "repo"
    shutil.copytree(two_versions, repo)
    ModelRepository(repo).set_label("captioner", "stable", 1)
    data = load_data(cfg)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.png", "a.png"):
        shutil.copyfile(data.image_path(data.splits["test"][0 if name == "a.png" else 1]), photos / name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    missing = tmp_path / "missing.png"

    result = Result(capsys, ["caption", "--model", str(repo), "--json", str(photos), str(missing)])
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(photos / "a.png"), str(photos / "b.png")]
    assert all(line["caption"] for line in lines)
    err = result.stderr
    assert f"model: {repo / 'captioner'} version 1 (labelled stable)" in err
    assert f"{photos / 'broken.jpg'}: corrupt or truncated image" in err
    assert f"{missing}: cannot read image" in err
    assert f"{photos / 'notes.txt'}: skipped" in err


def test_caption_a_run_folder_exits_zero(smoke_run, capsys):
    out, cfg = smoke_run
    data = load_data(cfg)
    image = str(data.image_path(data.splits["test"][0]))
    result = Result(capsys, ["caption", "--model", str(out), image])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{image}\t") and f"model: run {out}" in result.stderr


def test_export_takes_a_registered_version(smoke_run, two_versions, tmp_path, capsys):
    out, _ = smoke_run
    result = Result(capsys, ["export", "--model", str(two_versions / "captioner" / "2"),
                             "--output", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert f"version 2, trained in {out}" in result.stderr
    assert (tmp_path / "x" / "saved_model.pb").is_file()


def test_data_samples_prints_paths_of_the_configs_images(smoke_run, capsys):
    _, cfg = smoke_run
    data = load_data(cfg)
    result = Result(capsys, ["data", "samples", "--config", "smoke", "--split", "dev", "-n", "3"])
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert paths == [data.image_path(i).absolute() for i in data.splits["dev"][:3]]
    assert all(path.is_file() for path in paths)
    assert str(data.images_dir.absolute()) in result.stderr
    folder = Result(capsys, ["data", "samples", "--config", "smoke", "--folder"])
    assert folder.stdout.strip() == str(data.images_dir.absolute())
