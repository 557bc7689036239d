"""tf.distribute from config: MirroredStrategy over two logical CPU devices trains the model (with
length-bucketed batches of varying length; the multi-worker test trains full-length batches)."""

import csv
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from captioner.config import load_config
    from captioner.train import make_strategy, train_model
    from captioner.workflow import extract_step, load_data, tokenize_step
    cfg = load_config("smoke", ["train.distribute=mirrored", "train.epochs=2", "train.length_buckets=true"])
    data = load_data(cfg)
    tok = tokenize_step(cfg, data, sys.argv[1])
    store = extract_step(cfg, data, progress=False)
    replicas = make_strategy("mirrored").num_replicas_in_sync
    model, spec = train_model(cfg, data, tok, store, sys.argv[1], progress=False)
    print(json.dumps({"replicas": replicas}))
""")


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"replicas": 2}
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # Two cross-entropy epochs, then the smoke preset's SCST phase (its custom loop under strategy.run).
    assert [r["phase"] for r in rows] == ["xe", "xe", "scst", "scst"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert all(float(r["train_reward"]) > 0 and float(r["dev_cider"]) > 0 for r in rows[2:])
    assert (tmp_path / "model.weights.h5").is_file()
