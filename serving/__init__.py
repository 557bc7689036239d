"""The REST gateway: a Flask app in front of the model (in-process) or TensorFlow Serving (gRPC)."""
