"""Fixtures shared by the gateway tests."""

import pytest
from captioner.serving.app import create_app
from captioner.serving.settings import Settings

from captioner.registry import ModelRepository
from captioner.workflow import load_data


@pytest.fixture(scope="session")
def repo(smoke_run, tmp_path_factory):
    out, _ = smoke_run
    root = tmp_path_factory.mktemp("repo")
    ModelRepository(root).publish("captioner", out / "saved_model", {"metrics": {"bleu4": 0.3}})
    return root


@pytest.fixture(scope="session")
def client(repo):
    app = create_app(Settings(model_repo=str(repo), poll_seconds=0, log_requests=False, api_key=""))
    return app.test_client()


@pytest.fixture(scope="session")
def test_images(smoke_run):
    _, cfg = smoke_run
    data = load_data(cfg)
    return [data.image_path(i) for i in data.splits["test"][:6]]


