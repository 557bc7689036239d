"""The quality gate compares like with like: the champion is re-scored through its own SavedModel on
the candidate's test split (cached), whatever BLEU-4 it stored for the data it was tested on; and a
registered version carries its metrics in metadata.json and in the SavedModel the gateway serves."""

import json
import shutil
from pathlib import Path

import pytest
from captioner.components import steps
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

from captioner.config import load_config, with_overrides
from captioner.errors import CaptionerError
from captioner.registry import ModelRepository
from captioner.workflow import evaluate_and_gate, extract_step, load_data, register_model, run_training

pytestmark = pytest.mark.integration
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory, captioner_cache):
    """The smoke preset with no training: same data and features as `smoke_run`, BLEU-4 about 0."""
    out = tmp_path_factory.mktemp("untrained") / "run"
    cfg = load_config("smoke", ["train.epochs=0"])
    run_training(cfg, out, progress=False)
    return out, cfg


@pytest.fixture(scope="module")
def store(smoke_run):
    _, cfg = smoke_run
    return extract_step(cfg, load_data(cfg), progress=False)  # the session's cached features


def evaluation_metrics(run: Path) -> dict:
    report = json.loads((run / "evaluation.json").read_text())
    return {k: report[k] for k in METRICS}


def gate_of(run, cfg, store, repo, floor=0.0, **options):
    return evaluate_and_gate(cfg, run, store, model_repo=str(repo), model_name="captioner", bleu4_floor=floor,
                             tolerance=0.005, progress=False, **options)


def test_better_candidate_passes_and_the_champion_score_is_cached(smoke_run, untrained_run, store, tmp_path):
    run, cfg = smoke_run
    repo = ModelRepository(tmp_path / "models")
    repo.publish("captioner", untrained_run[0] / "saved_model", {"metrics": evaluation_metrics(untrained_run[0])})
    report, decision = gate_of(run, cfg, store, repo.root)
    assert decision.passed and decision.champion_version == 1 and decision.champion_scored == "rescored"
    assert decision.champion_bleu4 < decision.candidate_bleu4 == report["bleu4"]
    split = decision.split
    assert split["dataset"] == "synthetic" and split["images"] == 24 and len(split["fingerprint"]) == 16
    assert f"{decision.candidate_bleu4:.4f}" in decision.reason and f"{decision.champion_bleu4:.4f}" in decision.reason
    assert f"fingerprint {split['fingerprint'][:8]}, 24 images" in decision.reason
    _, again = gate_of(run, cfg, store, repo.root)
    assert again.champion_scored == "cached" and again.champion_bleu4 == decision.champion_bleu4


def test_worse_candidate_on_the_same_data_is_rejected_by_the_champion(smoke_run, untrained_run, store, tmp_path):
    run, cfg = smoke_run
    repo = ModelRepository(tmp_path / "models")
    repo.publish("captioner", run / "saved_model", {"metrics": evaluation_metrics(run)})
    _, decision = gate_of(untrained_run[0], untrained_run[1], store, repo.root, floor=0.0)
    assert not decision.passed and decision.champion_scored == "rescored"
    assert "worse than champion v1" in decision.reason
    assert f"{decision.candidate_bleu4:.4f}" in decision.reason and f"{decision.champion_bleu4:.4f}" in decision.reason
    # Re-scored through its SavedModel from the images, the champion scores what its own
    # evaluation (cached features) said on this same split.
    assert decision.champion_bleu4 == pytest.approx(evaluation_metrics(run)["bleu4"], abs=0.02)


def test_first_model_on_new_data_is_judged_by_the_champion_score_on_that_data(smoke_run, untrained_run, store,
                                                                               tmp_path):
    """After `make demo` the champion says BLEU-4 0.94 (on its own synthetic test split). A candidate
    on other data is compared with what that champion scores on the candidate's split."""
    run, cfg = smoke_run
    repo = ModelRepository(tmp_path / "models")
    claimed = {"dataset": "synthetic", "split": "test", "fingerprint": "feedfacefeedface", "images": 200}
    repo.publish("captioner", untrained_run[0] / "saved_model", {"metrics": {"bleu4": 0.94},
                                                                 "evaluation_split": claimed})
    _, decision = gate_of(run, cfg, store, repo.root, floor=0.1)
    assert decision.passed, decision.reason
    assert decision.champion_stored_bleu4 == 0.94 and decision.champion_bleu4 < 0.1
    assert decision.split["fingerprint"] != claimed["fingerprint"]


def test_evaluate_step_refuses_data_changed_since_the_fingerprint(smoke_run, store, tmp_path):
    """The candidate's features come from the data the fingerprint describes; the champion would be
    re-scored on the images read now: scoring both after a change would not compare like with like."""
    run, _ = smoke_run
    stale = "data=0123456789abcdef;code=0.1.0;config=000000000000"
    outputs = {name: cls(name=name, uri=str(tmp_path / name))
               for name, cls in (("metrics", Metrics), ("report", HTML), ("evaluation", Artifact))}
    with pytest.raises(CaptionerError, match="the data changed while the pipeline ran"):
        steps.evaluate("smoke", [], stale, Model(name="model", uri=str(run)),
                       Dataset(name="features", uri=str(store.folder)), str(tmp_path / "models"), "captioner",
                       0.0, 0.005, **outputs)
    assert not any((tmp_path / name).exists() for name in outputs)


def test_unscorable_champion_rejects_with_the_way_out_unless_allowed(smoke_run, untrained_run, store, tmp_path):
    """A champion that cannot be loaded any more rejects every candidate by default, saying how to
    proceed; allowed, the floor alone decides, never the champion's stored BLEU-4 (0.94 here)."""
    run, cfg = smoke_run
    repo = ModelRepository(tmp_path / "models")
    repo.publish("captioner", untrained_run[0] / "saved_model", {"metrics": {"bleu4": 0.94}})
    (Path(repo.model_path("captioner", 1)) / "saved_model.pb").write_bytes(b"not a SavedModel")
    _, kept = gate_of(run, cfg, store, repo.root)
    assert not kept.passed and kept.champion_scored == "unscorable" and kept.champion_bleu4 is None
    assert kept.champion_error and kept.champion_error in kept.reason
    assert "--allow-unscorable-champion" in kept.reason and "captioner export" in kept.reason
    report, allowed = gate_of(run, cfg, store, repo.root, allow_unscorable_champion=True)
    assert allowed.passed and allowed.champion_bleu4 is None and "the floor alone decides" in allowed.reason
    assert report["gate"]["passed"] is True and "0.94" not in allowed.reason


def test_champion_with_a_shorter_decode_state_is_rescored_at_its_length(smoke_run, untrained_run, store, tmp_path):
    """The candidate decodes up to 12 tokens (smoke preset); a champion exported with room for 8 is
    re-scored with 8, and the reason says so, instead of failing and rejecting every candidate."""
    from captioner.export import export_saved_model
    from captioner.features.backbones import build_backbone
    from captioner.train import load_trained

    run, cfg = smoke_run
    assert cfg.decode.max_length == 12
    model, _, spec = load_trained(untrained_run[0])
    short = with_overrides(spec.full_config, {"decode": {"max_length": 8}, "export": {"max_decode_length": 8}})
    backbone = build_backbone(short.features.backbone, short.features.weights, short.features.image_size)
    export_saved_model(backbone, model, untrained_run[0], tmp_path / "short", short)
    repo = ModelRepository(tmp_path / "models")
    repo.publish("captioner", tmp_path / "short", {"metrics": evaluation_metrics(untrained_run[0])})
    report, decision = gate_of(run, cfg, store, repo.root)
    assert decision.passed and decision.champion_scored == "rescored", decision.reason
    assert decision.champion_max_length == 8 and report["champion_scores"]["max_length"] == 8
    assert decision.decode["max_length"] == 12
    assert "max_length 8" in decision.reason and "max_decode_length" in decision.reason


def test_floor_rejects_a_first_model(smoke_run, store, tmp_path):
    run, cfg = smoke_run
    _, decision = gate_of(run, cfg, store, tmp_path / "empty", floor=0.99)
    assert not decision.passed and decision.champion_version is None
    assert "below the floor 0.9900" in decision.reason and "24 images" in decision.reason


def test_registered_version_carries_its_metrics_in_the_served_savedmodel(untrained_run, tmp_path):
    """The pipeline's train step exports before evaluation (no metrics in the SavedModel);
    registration puts the evaluated metrics into the SavedModel too, for /model/info."""
    from captioner.serving.backends import LocalBackend

    from captioner.export import export_saved_model, read_metadata
    from captioner.features.backbones import build_backbone
    from captioner.predictor import SavedModelCaptioner
    from captioner.train import load_trained

    source, _ = untrained_run
    run = tmp_path / "run"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("saved_model"))
    model, _, spec = load_trained(run)
    cfg = spec.full_config
    backbone = build_backbone(cfg.features.backbone, cfg.features.weights, cfg.features.image_size)
    export_saved_model(backbone, model, run, run / "saved_model", cfg)  # as the train component does
    assert read_metadata(run / "saved_model")["metrics"] == {}
    evaluation = json.loads((source / "evaluation.json").read_text())
    repo = str(tmp_path / "models")
    version, created = register_model(run, repo, "captioner", evaluation, pipeline_run_id="run-1")
    assert (version, created) == (1, True)
    metrics = {k: evaluation[k] for k in METRICS}
    assert ModelRepository(repo).metadata("captioner", 1)["metrics"] == metrics
    published = Path(repo) / "captioner" / "1"
    assert read_metadata(published)["metrics"] == metrics
    assert SavedModelCaptioner(published).metadata["metrics"] == metrics  # the `metadata` signature
    backend = LocalBackend(model_repo=repo, poll_seconds=0).start()
    assert backend.info()["metadata"]["metrics"] == metrics
    # The same trained model again (a cached rerun) is not registered twice.
    assert register_model(run, repo, "captioner", evaluation, pipeline_run_id="run-2") == (1, False)


def test_pipeline_run_keeps_the_serving_base_path_in_the_repository(tmp_path):
    """`captioner pipeline run --serving-base-path /models` stores it before any step runs (this run
    fails at its first step: the data are missing), so every later write of models.config uses it.
    ``--allow-unscorable-champion`` reaches the pipeline's parameters (the run record keeps them)."""
    from click.testing import CliRunner

    from captioner.cli import cli

    repo = tmp_path / "models"
    result = CliRunner().invoke(cli, ["pipeline", "run", "--local", "--config", "smoke",
                                      "--set", "data.format=flickr8k", "--set", f"data.root={tmp_path / 'nowhere'}",
                                      "--pipeline-root", str(tmp_path / "root"), "--model-repo", str(repo),
                                      "--serving-base-path", "/models", "--allow-unscorable-champion"])
    assert result.exit_code != 0
    assert ModelRepository(repo).serving_base_path == "/models"
    (record,) = (tmp_path / "root" / "captioner-runs").glob("*.json")
    assert json.loads(record.read_text())["parameters"]["allow_unscorable_champion"] is True
