"""The one pipeline factory: fingerprint -> tokenize -> extract features -> train -> evaluate -> (gate) -> register.

Extraction fans out: ``plan-shards`` lists ``extract_shards`` indices, one ``extract-features-shard``
task per index runs in parallel (``dsl.ParallelFor``) and ``collect-features`` merges them
(``dsl.Collected``) into the artifact train and evaluate read (``captioner.pipelines.fanout``). The
train step runs as one container, or on several machines as a Vertex AI custom job or a Kubeflow
TFJob (``TrainScale``, fixed when the pipeline is compiled; ``captioner.pipelines.scale``).

The fingerprint step (data, code, config; ``captioner.fingerprint``) is never cached, and its output
is an input of tokenize, extract, train and evaluate: KFP's cache key hashes a task's inputs, so those
steps come from the cache exactly while the data, the code and the config are unchanged, and each of
them refuses data that changed since the fingerprint step looked.
"""

from captioner.components.steps import build_components
from captioner.pipelines.scale import TrainScale, tfjob_component, vertex_custom_job
from kfp import dsl
from kfp.dsl import Dataset

PIPELINE_NAME = "captioner-training"
# The component image is pinned when the pipeline is compiled (`captioner pipeline compile --image ...`);
# this default is what `make images` tags and what the committed pipeline.yaml names.
DEFAULT_IMAGE = "us-docker.pkg.dev/captioner-project/captioner/components:0.1.0"


def _extract_fanned_out(steps, config, overrides, fingerprint, extract_shards):
    """plan-shards -> extract-features-shard per index, in parallel -> collect-features; returns the
    collect task, whose ``features`` the next steps read."""
    plan = steps.plan_shards(extract_shards=extract_shards, fingerprint=fingerprint.output).set_display_name(
        "plan shards").set_cpu_request("0.5").set_memory_request("1G")
    with dsl.ParallelFor(plan.output, name="extract-shards") as item:
        shard = steps.extract_features_shard(config=config, overrides=overrides, fingerprint=item.fingerprint,
                                             shard_index=item.shard_index, extract_shards=extract_shards)
        # CPU machines, many of them: kfp 2.17 does not carry run parameters used as resources
        # (accelerator_type/count) into a loop's body (the loop declares no such input), so the
        # shards cannot take the run's GPUs; more shards make up for it.
        shard.set_display_name("extract features (shard)").set_cpu_request("4").set_memory_request("16G")
    collect = steps.collect_features(config=config, overrides=overrides, fingerprint=fingerprint.output,
                                     shards=dsl.Collected(shard.outputs["features"])).set_display_name(
                                         "collect features").set_cpu_request("2").set_memory_request("8G")
    return collect


def create_feature_pipeline(image: str = DEFAULT_IMAGE):
    """Only fingerprint and the fanned-out extraction: fills the feature cache for a data set (e.g.
    ahead of the first training run over a large one), and what the tests run under kfp.local."""
    steps = build_components(image)

    @dsl.pipeline(name=f"{PIPELINE_NAME}-features", description="Extract backbone features, fanned out over shards.")
    def captioner_features(config: str = "synthetic", overrides: list = [],  # noqa: B006 - KFP parameter defaults
                           extract_shards: int = 1) -> Dataset:
        fingerprint = steps.fingerprint(config=config, overrides=overrides, image=image).set_display_name(
            "fingerprint data").set_caching_options(False)
        collect = _extract_fanned_out(steps, config, overrides, fingerprint, extract_shards)
        return collect.outputs["features"]

    return captioner_features


def create_pipeline(image: str = DEFAULT_IMAGE, scale: TrainScale | None = None):
    scale = scale or TrainScale()
    steps = build_components(image)
    train_op, distributed = steps.train, {}
    if scale.trainer == "vertex-custom-job":
        train_op = vertex_custom_job(steps.train, scale, display_name="captioner-train")
    elif scale.trainer == "tfjob":
        train_op = tfjob_component(steps.train, scale)
    if scale.distributed:
        distributed = {"distribute": "multi_worker"}

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Train, evaluate and (if it passes the gate) register an image-captioning model.")
    def captioner_training(
        config: str = "synthetic",
        overrides: list = [],  # noqa: B006 - KFP pipeline parameters are declared with their defaults
        model_repo: str = "models",
        model_name: str = "captioner",
        bleu4_floor: float = 0.1,
        tolerance: float = 0.005,
        allow_unscorable_champion: bool = False,
        accelerator_type: str = "NVIDIA_TESLA_T4",
        accelerator_count: int = 1,
        extract_shards: int = 1,
    ):
        # Never from the cache: it is what tells a run over new data from last week's.
        fingerprint = steps.fingerprint(config=config, overrides=overrides, image=image).set_display_name(
            "fingerprint data").set_caching_options(False).set_cpu_request("1").set_memory_request("2G")
        tokenize = steps.tokenize(config=config, overrides=overrides,
                                  fingerprint=fingerprint.output).set_display_name("tokenize")
        extract = _extract_fanned_out(steps, config, overrides, fingerprint, extract_shards)
        train = train_op(config=config, overrides=overrides, fingerprint=fingerprint.output,
                         vocab=tokenize.outputs["vocab"], features=extract.outputs["features"],
                         **distributed).set_display_name("train")
        evaluate = steps.evaluate(config=config, overrides=overrides, fingerprint=fingerprint.output,
                                  model=train.outputs["model"], features=extract.outputs["features"],
                                  model_repo=model_repo, model_name=model_name, bleu4_floor=bleu4_floor,
                                  tolerance=tolerance,
                                  allow_unscorable_champion=allow_unscorable_champion).set_display_name(
                                      "evaluate (BLEU)")
        # The champion can change between runs, so the gate is never answered from the cache.
        evaluate.set_caching_options(False)
        with dsl.If(evaluate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 - a KFP expression
            # Registration exports the SavedModel again with its metrics (backbone built, model traced).
            steps.register(model=train.outputs["model"], evaluation=evaluate.outputs["evaluation"],
                           model_repo=model_repo, model_name=model_name,
                           run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_display_name("register").set_caching_options(
                               False).set_cpu_request("2").set_memory_request("4G")

        tokenize.set_cpu_request("1").set_memory_request("2G")
        # A multi-replica train task only launches the job (its machines are in TrainScale).
        if not scale.distributed:
            train.set_cpu_request("4").set_memory_request("16G")
            train.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
        if scale.trainer == "tfjob":
            train.set_cpu_request("0.5").set_memory_request("1G")
        evaluate.set_cpu_request("2").set_memory_request("8G")

    return captioner_training


def compile_pipeline(output: str, image: str = DEFAULT_IMAGE, scale: TrainScale | None = None) -> str:
    from kfp import compiler

    compiler.Compiler().compile(create_pipeline(image, scale), package_path=str(output))
    return str(output)
