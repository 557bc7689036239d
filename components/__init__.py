"""Kubeflow Pipelines components: one thin component per step over the captioner library."""
