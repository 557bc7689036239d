"""The captioner KFP pipeline: the DAG factory, compile, local run, submit and schedule."""
