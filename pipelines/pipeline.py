"""The one pipeline factory: fingerprint -> tokenize -> extract features -> train -> evaluate -> (gate) -> register.

The fingerprint step (data, code, config; ``captioner.fingerprint``) is never cached, and its output
is an input of tokenize, extract, train and evaluate: KFP's cache key hashes a task's inputs, so those
steps come from the cache exactly while the data, the code and the config are unchanged, and each of
them refuses data that changed since the fingerprint step looked.
"""

from captioner.components.steps import build_components
from kfp import dsl

PIPELINE_NAME = "captioner-training"
# The component image is pinned when the pipeline is compiled (`captioner pipeline compile --image ...`);
# this default is what `make images` tags and what the committed pipeline.yaml names.
DEFAULT_IMAGE = "us-docker.pkg.dev/captioner-project/captioner/components:0.1.0"


def create_pipeline(image: str = DEFAULT_IMAGE):
    steps = build_components(image)

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
    ):
        # Never from the cache: it is what tells a run over new data from last week's.
        fingerprint = steps.fingerprint(config=config, overrides=overrides, image=image).set_display_name(
            "fingerprint data").set_caching_options(False).set_cpu_request("1").set_memory_request("2G")
        tokenize = steps.tokenize(config=config, overrides=overrides,
                                  fingerprint=fingerprint.output).set_display_name("tokenize")
        extract = steps.extract_features(config=config, overrides=overrides,
                                         fingerprint=fingerprint.output).set_display_name("extract features")
        train = steps.train(config=config, overrides=overrides, fingerprint=fingerprint.output,
                            vocab=tokenize.outputs["vocab"], features=extract.outputs["features"]).set_display_name(
                                "train")
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
        for task in (extract, train):
            task.set_cpu_request("4").set_memory_request("16G")
            task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
        evaluate.set_cpu_request("2").set_memory_request("8G")

    return captioner_training


def compile_pipeline(output: str, image: str = DEFAULT_IMAGE) -> str:
    from kfp import compiler

    compiler.Compiler().compile(create_pipeline(image), package_path=str(output))
    return str(output)
