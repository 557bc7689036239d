"""The captioning model and its decoders."""
