"""Backbones and the feature cache."""
