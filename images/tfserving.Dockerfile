# TF Serving on GPU with the project's batching and monitoring config baked in; the models come
# from the repository the pipeline registers into (--model_config_file on GCS). Batching is on for
# every signature: the export keeps all of them batchable (see serving/deploy/batching_parameters.txt).
FROM tensorflow/serving:2.21.0-gpu

COPY serving/deploy/batching_parameters.txt serving/deploy/monitoring.config /config/

EXPOSE 8500 8501
ENTRYPOINT ["tensorflow_model_server", "--port=8500", "--rest_api_port=8501", \
            "--enable_batching=true", "--batching_parameters_file=/config/batching_parameters.txt", \
            "--monitoring_config_file=/config/monitoring.config"]
