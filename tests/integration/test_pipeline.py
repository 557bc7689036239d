"""The KFP pipeline: golden compiled YAML, components called as functions, and kfp.local runs."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from captioner.components import steps
from captioner.pipelines.local import list_runs, run_local
from captioner.pipelines.pipeline import compile_pipeline
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

from captioner.errors import CaptionerError
from captioner.registry import ModelRepository

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_committed_pipeline_yaml_is_up_to_date(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    committed = ROOT / "pipeline.yaml"
    assert committed.is_file(), "run `captioner pipeline compile --output pipeline.yaml`"
    assert Path(fresh).read_text() == committed.read_text(), (
        "pipeline.yaml is out of date: run `captioner pipeline compile --output pipeline.yaml` and commit it")


def test_compiled_dag_shape():
    spec = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"fingerprint", "tokenize", "plan-shards", "for-loop-1", "collect-features", "train", "evaluate",
            "condition-2"} <= set(tasks)
    assert set(tasks["train"]["dependentTasks"]) == {"fingerprint", "tokenize", "collect-features"}
    # Extraction fans out: a loop over plan-shards' list of indices, its shards collected into one artifact
    # that train and evaluate read; the shard count is a run parameter.
    items = tasks["for-loop-1"]["parameterIterator"]["items"]
    assert items == {"inputParameter": "pipelinechannel--plan-shards-Output"}
    assert tasks["plan-shards"]["inputs"]["parameters"]["extract_shards"] == {
        "componentInputParameter": "extract_shards"}
    assert spec["root"]["inputDefinitions"]["parameters"]["extract_shards"]["parameterType"] == "NUMBER_INTEGER"
    loop = spec["components"]["comp-for-loop-1"]["dag"]
    assert set(loop["tasks"]) == {"extract-features-shard"}
    shard_inputs = loop["tasks"]["extract-features-shard"]["inputs"]["parameters"]
    for name in ("shard_index", "fingerprint"):
        assert shard_inputs[name] == {"componentInputParameter": "pipelinechannel--plan-shards-Output-loop-item",
                                      "parameterExpressionSelector": f'parseJson(string_value)["{name}"]'}
    collected = tasks["collect-features"]["inputs"]["artifacts"]["shards"]["taskOutputArtifact"]
    assert collected == {"outputArtifactKey": "pipelinechannel--extract-features-shard-features",
                         "producerTask": "for-loop-1"}
    assert spec["components"]["comp-collect-features"]["inputDefinitions"]["artifacts"]["shards"]["isArtifactList"]
    for name in ("train", "evaluate"):
        features = tasks[name]["inputs"]["artifacts"]["features"]["taskOutputArtifact"]
        assert features["producerTask"] == "collect-features"
    # The fingerprint step always runs, and every step that reads data takes its output as an input,
    # which is what KFP's cache key hashes.
    assert not tasks["fingerprint"]["cachingOptions"].get("enableCache")
    # (The shards get it in plan-shards' items.)
    for name in ("tokenize", "plan-shards", "collect-features", "train", "evaluate"):
        source = tasks[name]["inputs"]["parameters"]["fingerprint"]["taskOutputParameter"]
        assert source == {"outputParameterKey": "Output", "producerTask": "fingerprint"}
    for name in ("tokenize", "collect-features", "train"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True
    assert not tasks["evaluate"]["cachingOptions"].get("enableCache")
    assert "pipelinechannel--evaluate-Output" in tasks["condition-2"]["triggerPolicy"]["condition"]
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["image"].startswith("us-docker.pkg.dev/") and "pip install" not in json.dumps(train)
    assert "accelerator" in train["resources"] and "cpuRequest" in train["resources"]
    # Shards are CPU tasks: the loop's body cannot take the run's accelerator parameters (kfp 2.17).
    shard = executors["exec-extract-features-shard"]["container"]["resources"]
    assert "accelerator" not in shard and float(shard["cpuRequest"]) >= 4, shard
    for name, executor in executors.items():
        assert "resources" in executor["container"], f"{name} has no resource requests"
    # Registration exports the SavedModel again (backbone built, model traced): as much as that needs.
    register = executors["exec-register"]["container"]["resources"]
    assert float(register["cpuRequest"]) >= 2 and float(register["memoryRequest"]) >= 4, register


def test_fanned_out_extraction_equals_one_step(tmp_path, captioner_cache):
    """Issue #11: under kfp.local, two shards extracted in parallel (dsl.ParallelFor) and collected
    (dsl.Collected) give every image, and every mirrored copy, the very features of one extraction
    step. Each side has its own feature cache, so both really run the backbone."""
    import numpy as np
    from captioner.pipelines.pipeline import create_feature_pipeline
    from kfp import local

    from captioner.features.extract import FeatureStore

    def overrides(cache):
        return ["features.flip_train=true", f"features.cache_dir={tmp_path / cache}"]

    one = Dataset(name="features", uri=str(tmp_path / "one"))
    steps.extract_features("smoke", overrides("cache-one"), steps.fingerprint("smoke", overrides("cache-one"), ""),
                           one)

    root = tmp_path / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=False,
               raise_on_error=True)
    fanned = create_feature_pipeline()(config="smoke", overrides=overrides("cache-fan"), extract_shards=2).output

    shards = [json.loads(p.read_text())["artifacts"]["features"]["artifacts"][0]["metadata"]
              for p in sorted(root.glob("*/for-loop-*-iteration-*/extract-features-shard/executor_output.json"))]
    assert [s["shard"] for s in shards] == [0, 1] and all(s["images"] > 0 for s in shards)
    assert sum(s["images"] for s in shards) == 348  # every image in exactly one shard
    assert sum(s["extracted"] for s in shards) == fanned.metadata["extracted"] == one.metadata["extracted"] > 0
    a, b = FeatureStore(Path(one.path)), FeatureStore(Path(fanned.path))
    names = sorted(a.index)
    assert names == sorted(b.index) and len(names) > 348 and any(n.endswith("#flip") for n in names)
    assert fanned.metadata["images"] == one.metadata["images"] == len(names) and fanned.metadata["shards"] == 2
    assert np.array_equal(a.load(names), b.load(names))


def test_shards_cover_the_images_and_collect_refuses_a_lost_one(tmp_path):
    import numpy as np
    from captioner.pipelines.fanout import collect_stores, shard_images

    from captioner.errors import DataError
    from captioner.features.extract import FeatureStore

    images = [f"img{i}.jpg" for i in range(11)]
    parts = [shard_images(images, i, 4) for i in range(4)]
    assert [len(p) for p in parts] == [3, 3, 3, 2] and sum(parts, []) == images
    assert shard_images(images[:1], 1, 2) == []  # more shards than images: an empty shard, not an error
    with pytest.raises(CaptionerError, match="shard index 4 is outside 0..3"):
        shard_images(images, 4, 4)
    with pytest.raises(CaptionerError, match="extract_shards 0"):
        shard_images(images, 0, 0)
    stores = []
    for number, part in enumerate(parts):
        kept = part[1:] if number == 2 else part  # shard 2 lost its first image
        store = FeatureStore(tmp_path / f"shard{number}")
        store.folder.mkdir()
        store.append(kept, np.full((len(kept), 2, 3), number, np.float16))
        stores.append(store.folder)
    with pytest.raises(DataError, match=r"lack 1 image\(s\), e.g. \['img6.jpg'\]"):
        collect_stores(stores, tmp_path / "merged", images)
    merged = collect_stores(stores, tmp_path / "merged-ok", [i for i in images if i != "img6.jpg"])
    assert merged.load(["img0.jpg", "img7.jpg", "img10.jpg"])[:, 0, 0].tolist() == [0, 2, 3]


def test_components_as_functions(tmp_path, captioner_cache):
    def art(cls, name):
        return cls(name=name, uri=str(tmp_path / name))

    vocab, features, model = art(Dataset, "vocab"), art(Dataset, "features"), art(Model, "model")
    overrides = ["train.epochs=2"]
    fingerprint = steps.fingerprint("smoke", overrides, "")
    assert fingerprint.startswith("data=") and ";code=" in fingerprint and ";config=" in fingerprint
    steps.tokenize("smoke", overrides, fingerprint, vocab)
    assert (Path(vocab.path) / "vocab.json").is_file() and vocab.metadata["vocab_size"] > 10
    steps.extract_features("smoke", overrides, fingerprint, features)
    assert features.metadata["images"] == 348 and (Path(features.path) / "index.json").is_file()
    train_metrics = art(Metrics, "train_metrics")
    steps.train("smoke", overrides, fingerprint, vocab, features, model, train_metrics)
    assert (Path(model.path) / "saved_model" / "saved_model.pb").is_file()
    # The smoke preset goes on with SCST after its cross-entropy epochs.
    assert train_metrics.metadata["epochs"] == 2 and Path(train_metrics.path).is_file()
    assert train_metrics.metadata["scst_epochs"] == 2 and "final_train_reward" in train_metrics.metadata
    metrics, report, evaluation = art(Metrics, "metrics"), art(HTML, "report"), art(Artifact, "evaluation")
    repo = str(tmp_path / "repo")
    passed = steps.evaluate("smoke", overrides, fingerprint, model, features, repo, "captioner", 0.0, 0.005, metrics,
                            report, evaluation)
    assert passed is True and "bleu4" in metrics.metadata and "greedy_cider" in metrics.metadata
    html = Path(report.path).read_text()
    assert "<svg" in html and "data:image/jpeg;base64" in html and "Attention" in html and "BLEU-4" in html
    assert ">SCST</text>" in html and ">cross-entropy</text>" in html and "dev_cider" in html
    registered = art(Model, "registered")
    assert steps.register(model, evaluation, repo, "captioner", "run-1", registered) == 1
    metadata = ModelRepository(repo).metadata("captioner", 1)
    assert metadata["pipeline_run_id"] == "run-1" and metadata["metrics"]["bleu4"] == metrics.metadata["bleu4"]
    assert metadata["config"]["name"] == "smoke" and metadata["framework"] == "tensorflow"
    assert steps.register(model, evaluation, repo, "captioner", "run-2", registered) == 1  # same model: no v2
    assert ModelRepository(repo).versions("captioner") == [1]


@pytest.mark.slow
def test_local_dag_registers_caches_and_gates(dag_history):
    """The shared runs (tests/integration/conftest.py): a first run registers, the same run again comes
    from the cache and registers nothing, and an untrained candidate is gated out."""
    first, again, worse, repo = dag_history.first, dag_history.again, dag_history.worse, dag_history.repo
    assert first["status"] == "succeeded" and first["gate"]["passed"] is True
    assert first["parameters"]["bleu4_floor"] == 0.05
    assert first["registered_version"] == 1
    assert (Path(repo) / "captioner" / "1" / "saved_model.pb").is_file()
    assert (Path(repo) / "models.config").is_file()

    assert {again["tasks"][t]["status"] for t in ("tokenize", "extract-features", "train")} == {"cached"}
    assert again["registered_version"] is None and again["already_registered_as"] == 1
    assert dag_history.versions["again"] == [1]

    assert "train.epochs=0" in worse["parameters"]["overrides"]
    assert worse["gate"]["passed"] is False and worse["tasks"]["register"]["status"] == "skipped"
    assert dag_history.versions["worse"] == dag_history.versions["changed"]
    runs = [first, again, dag_history.changed, worse]
    assert dag_history.listed == sorted(r["run_id"] for r in runs)
    assert dag_history.latest == worse["run_id"]


def test_step_refuses_data_changed_since_the_fingerprint(tmp_path, captioner_cache):
    vocab = Dataset(name="vocab", uri=str(tmp_path / "vocab"))
    stale = "data=0123456789abcdef;code=0.1.0;config=000000000000"
    with pytest.raises(CaptionerError, match="the data changed while the pipeline ran"):
        steps.tokenize("smoke", [], stale, vocab)
    assert not (tmp_path / "vocab").exists()


@pytest.mark.slow
def test_scheduled_retraining_follows_the_data(dag_history):
    """Issue #7: a scheduled rerun over unchanged data comes from the cache and registers nothing;
    new captions make tokenize, extract and train run again (extract finds no new image content).
    The runs are the shared ones (tests/integration/conftest.py)."""
    data, first, again, changed = dag_history.data, dag_history.first, dag_history.again, dag_history.changed
    versions = dag_history.versions
    reading = ("tokenize", "extract-features", "train")

    def extracted(record):
        return record["tasks"]["extract-features"]["outputs"]["artifacts"]["features"]["metadata"]

    assert {first["tasks"][t]["status"] for t in ("fingerprint", *reading)} == {"succeeded"}
    # Features are cached by image content: images with the same bytes are extracted once.
    distinct = len({hashlib.sha256(p.read_bytes()).hexdigest() for p in (data / "images").iterdir()})
    assert extracted(first)["extracted"] == distinct and extracted(first)["images"] == 348
    assert first["registered_version"] == 1

    assert again["tasks"]["fingerprint"]["status"] == "succeeded"  # never from the cache
    assert again["fingerprint"] == first["fingerprint"]
    assert {again["tasks"][t]["status"] for t in reading} == {"cached"}
    assert again["registered_version"] is None and versions["again"] == [1]

    # Five new captions for train images were appended to captions.tsv before this run.
    assert (data / "captions.tsv").read_text().endswith("".join(dag_history.new_captions))
    assert changed["fingerprint"] != first["fingerprint"]
    assert {changed["tasks"][t]["status"] for t in reading} == {"succeeded"}
    # The images did not change: extract runs, but the backbone sees none of them.
    assert extracted(changed)["extracted"] == 0 and extracted(changed)["images"] == 348

    # On the champion's own data, an untrained candidate (no epochs, no SCST) clears a zero floor but
    # not the champion, which the gate re-scores on this very split.
    worse = dag_history.worse
    reason = worse["gate"]["reason"]
    assert worse["parameters"]["bleu4_floor"] == 0.0
    assert worse["gate"]["passed"] is False and worse["tasks"]["register"]["status"] == "skipped", reason
    assert "worse than champion" in reason and "below the floor" not in reason and "24 images" in reason, reason
    assert versions["worse"] == versions["changed"]


def test_failing_step_stops_the_run_and_registers_nothing(tmp_path, captioner_cache):
    root, repo = tmp_path / "root", tmp_path / "models"
    # The data are read first by the fingerprint step.
    with pytest.raises(CaptionerError, match="failed at step fingerprint") as failed:
        run_local("smoke", ["data.format=flickr8k", f"data.root={tmp_path / 'nowhere'}"], pipeline_root=root,
                  model_repo=str(repo), bleu4_floor=0.0)
    record = list_runs(root)[-1]
    # The error names the log of the steps' own output, which holds the failing step's message.
    assert f"the steps' output: {record['log']}" in str(failed.value)
    assert str(tmp_path / "nowhere") in Path(record["log"]).read_text()
    assert record["status"] == "failed" and record["tasks"]["fingerprint"]["status"] == "failed"
    assert record["tasks"]["tokenize"]["status"] == "not run"
    assert record["tasks"]["register"]["status"] == "not run"
    assert not repo.exists() or ModelRepository(repo).versions("captioner") == []
