"""The gateway's TF Serving backend under concurrent load, against the batching gRPC stand-in
(``captioner.serving.grpc_server``: BatchingSession's merge rules, 2 ms batch timeout), issue #8.

N clients (default 8) post images for --seconds (default 20) through the gateway (tfserving backend).
Reports requests, errors, latency p50/p99, captions that differ from the library's
(SavedModelCaptioner on the same bytes) and how the server batched decode_step calls (requests per
batch). The test suite runs the same check on a fixed number of requests per client, started
together (tests/integration/test_gateway.py::test_concurrent_clients_are_batched_by_the_server).
The stand-in runs every merged batch eagerly in Python: its throughput says nothing about TF Serving's.

    python benchmarks/bench_tfserving_batching.py --saved-model runs/f8k/saved_model \
        --image ../shared/data/flickr8k/images/1000268201_693b08cb0e.jpg

Prints the figures and saves them to benchmarks/results/tfserving-batching-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved-model", required=True, type=Path)
    parser.add_argument("--image", action="append", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    args = parser.parse_args()

    from captioner.serving.app import create_app
    from captioner.serving.grpc_server import ModelServer
    from captioner.serving.settings import Settings

    from captioner.predictor import SavedModelCaptioner
    from captioner.registry import ModelRepository

    uploads = [p.read_bytes() for p in args.image]
    library = [r.caption for r in SavedModelCaptioner(args.saved_model).caption_files(args.image,
                                                                                       beam_size=args.beam_size)]
    with tempfile.TemporaryDirectory() as scratch:
        ModelRepository(scratch).publish("captioner", args.saved_model, {"metrics": {}})
        server = ModelServer(scratch, batch_timeout_seconds=args.batch_timeout_ms / 1000).start()
        app = create_app(Settings(backend="tfserving", tfserving_target=server.target, log_requests=False,
                                  deadline_seconds=120, default_beam_size=args.beam_size))
        latencies, errors, differ, stop = [], [], [], threading.Event()

        def client(offset: int) -> None:
            local, i = app.test_client(), offset
            while not stop.is_set():
                index = i % len(uploads)
                started = time.perf_counter()
                response = local.post("/predict", data={"file": (io.BytesIO(uploads[index]), "x.jpg")},
                                      content_type="multipart/form-data")
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors.append(response.status_code)
                elif response.json["caption"] != library[index]:
                    differ.append(index)
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        server.stop()
    per_batch = collections.Counter()
    for (signature, tasks, _), count in server.batches.items():
        if signature == "decode_step":
            per_batch[tasks] += count
    ordered = sorted(latencies)
    figures = {
        "clients": args.clients, "seconds": round(elapsed, 1), "beam_size": args.beam_size,
        "requests": len(latencies), "errors": len(errors), "captions_differing_from_library": len(differ),
        "requests_per_second": round(len(latencies) / elapsed, 2),
        "latency_p50_ms": round(statistics.median(ordered) * 1000, 1),
        "latency_p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1),
        "decode_step_batches_by_requests_merged": dict(sorted(per_batch.items())),
        "decode_step_batches_merged": sum(n for k, n in per_batch.items() if k > 1),
    }
    print(json.dumps(figures, indent=2))
    out = Path(__file__).parent / "results" / f"tfserving-batching-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
