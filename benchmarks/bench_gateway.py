"""Gateway figures of issue #4, against a real `captioner serve` (gunicorn) on loopback.

1. Overhead: p50 of POST /predict (beam 3, one 224x224 JPEG) vs the library called directly on the
   same bytes (load_image + SavedModelCaptioner), in the same run.
2. Throughput and latency (p50/p99) at 1, 4 and 16 concurrent clients; the 16-client run lasts
   --soak seconds and reports errors and the server's resident memory before/after.
3. A new version registered during a 4-client load: failed requests, and seconds until /model/info
   shows it.
4. Fuzz: --fuzz random payloads; status counts, zero 5xx, server still up.

    python benchmarks/bench_gateway.py --saved-model runs/f8k/saved_model \
        --image ../shared/data/flickr8k/images/1000268201_693b08cb0e.jpg

Prints the figures and saves them to benchmarks/results/gateway-<date>.json.

``--mode batching`` (issue #11) measures instead, in one run, the same server (``--threads``
16 by default, so that 16 requests are in flight at once) with ``CAPTIONER_BATCHING=on`` and
``off``: throughput, p50 and p99 at 1 and 16 concurrent clients, errors, and whether every caption
(and n-best list) equals the library's unbatched decoding of the image. Both servers run side by
side and the phases alternate for ``--rounds`` rounds (3 by default); the figures are the medians.
Saved to benchmarks/results/gateway-batching-<date>-<HHMM>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the gunicorn master and workers)."""
    total = 0
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def load(url: str, image: bytes, clients: int, seconds: float, form: dict, answers: list | None = None) -> dict:
    """``clients`` threads posting ``image`` for ``seconds``; with ``answers``, each 200's caption and
    n-best captions are appended to it."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker():
        session = requests.Session()
        while time.monotonic() < stop:
            start = time.perf_counter()
            body = None
            try:
                response = session.post(url + "/predict", files={"file": ("x.jpg", image, "image/jpeg")},
                                         data=form, timeout=60)
                status = response.status_code
                if answers is not None and status == 200:
                    body = response.json()
            except requests.RequestException:
                status = 0
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
                if body is not None:
                    answers.append((body["caption"], tuple(n["caption"] for n in body["nbest"])))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    begun = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begun
    errors = sum(n for s, n in statuses.items() if s != 200)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies),
            "throughput_rps": round(len(latencies) / wall, 2), "p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "p99_ms": round(percentile(latencies, 99) * 1000, 1), "errors": errors,
            "statuses": {str(k): v for k, v in statuses.items()}}


def start_server(repo_dir: Path, args, **env: str) -> tuple[subprocess.Popen, str]:
    """``captioner serve`` on a free port, once ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--model-repo", str(repo_dir),
                               "--port", str(port), "--workers", str(args.workers), "--threads", str(args.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "CAPTIONER_POLL_SECONDS": "1", "CAPTIONER_LOG_REQUESTS": "0", **env})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/ready", timeout=2).status_code == 200:
                return server, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit("gateway did not become ready")


def _median_run(runs: list[dict]) -> dict:
    """The medians of a cell's rounds (throughput, p50, p99); errors and requests summed."""
    return {"clients": runs[0]["clients"], "rounds": len(runs),
            "throughput_rps": round(statistics.median(r["throughput_rps"] for r in runs), 2),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 1),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 1),
            "requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
            "captions_identical": all(r["captions_identical"] for r in runs)}


def batching_comparison(args) -> None:
    """Issue #11: the same server with batching on and off, 1 and 16 clients, in one run."""
    from captioner.data.images import load_image
    from captioner.predictor import SavedModelCaptioner
    from captioner.registry import ModelRepository

    image = args.image.read_bytes()
    form = {"algorithm": "beam", "beam_size": str(args.beam_size)}
    runner = SavedModelCaptioner(args.saved_model)
    library = runner.caption_pixels(load_image(image, runner.image_size)[None], beam_size=args.beam_size)[0]
    expected = (library.caption, tuple(text for text, _ in library.nbest))
    del runner
    repo_dir = Path(tempfile.mkdtemp(prefix="bench-repo-"))
    ModelRepository(repo_dir).publish("captioner", args.saved_model, {"metrics": {}})
    results: dict = {"date": time.strftime("%Y-%m-%d"), "saved_model": str(args.saved_model),
                     "image": args.image.name, "beam_size": args.beam_size, "workers": args.workers,
                     "threads": args.threads, "seconds": args.seconds, "library_caption": library.caption,
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": {},
                     "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                  cwd=Path(__file__).resolve().parent).stdout.strip(),
                     # Changes not committed yet are part of what was measured.
                     "git_dirty": bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                      capture_output=True, text=True,
                                                      cwd=Path(__file__).resolve().parent).stdout.strip())}
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        # Both servers stay up and the load phases alternate (on, off, on, off, ...) for --rounds
        # rounds: a slow spell of the machine then falls on both sides instead of on one, and the
        # medians say what a single pass cannot (one-client figures move by 10% between passes).
        for batching in ("on", "off"):
            servers[batching] = start_server(repo_dir, args, CAPTIONER_BATCHING=batching)
            _, url = servers[batching]
            session = requests.Session()
            for _ in range(5):  # warm up: first calls trace the preprocessing for this image size
                session.post(url + "/predict", files={"file": ("x.jpg", image)}, data=form, timeout=120)
            load(url, image, 16, 3, form)
        rounds: dict[str, dict[str, list]] = {b: {"1": [], "16": []} for b in servers}
        for number in range(args.rounds):
            for clients in (1, 16):
                for batching in (("on", "off") if number % 2 == 0 else ("off", "on")):
                    answers: list = []
                    run = load(servers[batching][1], image, clients, args.seconds, form, answers)
                    run["captions_identical"] = bool(answers) and all(a == expected for a in answers)
                    run["distinct_answers"] = len(set(answers))
                    run["round"] = number + 1
                    rounds[batching][str(clients)].append(run)
                    print(f"round {number + 1} batching {batching}", json.dumps(run), flush=True)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(30)
        shutil.rmtree(repo_dir, ignore_errors=True)
    results["rounds"] = rounds
    results["runs"] = {b: {c: _median_run(runs) for c, runs in by_clients.items()} for b, by_clients in rounds.items()}
    on, off = results["runs"]["on"], results["runs"]["off"]

    def paired(numerator: list[dict], denominator: list[dict], key: str) -> list[float]:
        """A ratio per round, both sides measured minutes apart in that round."""
        return [a[key] / b[key] for a, b in zip(numerator, denominator, strict=True)]

    # The ratios the issue asks for, each the median over rounds of that round's ratio (unrounded:
    # a 2.497 must not pass as 2.5).
    scaling = statistics.median(paired(rounds["on"]["16"], rounds["on"]["1"], "throughput_rps"))
    p50_ratio = statistics.median(paired(rounds["on"]["1"], rounds["off"]["1"], "p50_ms"))
    p99_ratio = statistics.median(paired(rounds["on"]["16"], rounds["off"]["16"], "p99_ms"))
    results["summary"] = {
        "rounds": args.rounds,
        "scaling_on_16_vs_1": round(scaling, 3),
        "scaling_on_by_round": [round(x, 3) for x in paired(rounds["on"]["16"], rounds["on"]["1"], "throughput_rps")],
        "scaling_off_16_vs_1": round(statistics.median(
            paired(rounds["off"]["16"], rounds["off"]["1"], "throughput_rps")), 3),
        "throughput_16_on_vs_off": round(statistics.median(
            paired(rounds["on"]["16"], rounds["off"]["16"], "throughput_rps")), 2),
        "p99_16_on_vs_off": round(p99_ratio, 3),
        "p99_16_on_ms": on["16"]["p99_ms"], "p99_16_off_ms": off["16"]["p99_ms"],
        "p50_1_on_vs_off": round(p50_ratio, 3),
        "p50_1_on_vs_off_by_round": [round(x, 3) for x in paired(rounds["on"]["1"], rounds["off"]["1"], "p50_ms")],
        "errors": sum(r["errors"] for by_clients in rounds.values() for runs in by_clients.values() for r in runs),
        "captions_identical": all(r["captions_identical"] for by_clients in rounds.values()
                                  for runs in by_clients.values() for r in runs)}
    summary = results["summary"]
    results["acceptance"] = {
        "scaling_on_at_least_2.5": scaling >= 2.5,
        "p99_16_on_below_off": p99_ratio < 1,
        "p50_1_on_within_10pct_of_off": abs(p50_ratio - 1) <= 0.10,
        "no_errors": summary["errors"] == 0, "captions_identical": summary["captions_identical"]}
    print("acceptance", json.dumps(results["acceptance"]), flush=True)
    print("summary", json.dumps(results["summary"]), flush=True)
    # Several runs a day (on/off comparisons repeated): the time keeps them apart.
    out = Path(__file__).resolve().parent / "results" / f"gateway-batching-{time.strftime('%Y-%m-%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saved-model", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--mode", choices=("gateway", "batching"), default="gateway")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="per worker (default 4; 16 with --mode batching)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--soak", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="--mode batching: alternating on/off rounds (medians)")
    parser.add_argument("--fuzz", type=int, default=5000)
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 16 if args.mode == "batching" else 4
    if args.mode == "batching":
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        batching_comparison(args)
        return

    from captioner.serving.hostile import fuzz_payloads

    from captioner.data.images import load_image
    from captioner.predictor import SavedModelCaptioner
    from captioner.registry import ModelRepository

    image = args.image.read_bytes()
    repo_dir = Path(tempfile.mkdtemp(prefix="bench-repo-"))
    repo = ModelRepository(repo_dir)
    repo.publish("captioner", args.saved_model, {"metrics": {}})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--model-repo", str(repo_dir),
                               "--port", str(port), "--workers", str(args.workers), "--threads", str(args.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "CAPTIONER_POLL_SECONDS": "1", "CAPTIONER_LOG_REQUESTS": "0"})
    results: dict = {"date": time.strftime("%Y-%m-%d"), "saved_model": str(args.saved_model),
                     "image": args.image.name, "workers": args.workers, "threads": args.threads,
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("gateway did not become ready")
        form = {"algorithm": "beam", "beam_size": "3"}

        # 1. overhead vs the library on the same bytes
        runner = SavedModelCaptioner(args.saved_model)
        session = requests.Session()
        for _ in range(3):
            runner.caption_pixels(load_image(image, runner.image_size)[None], beam_size=3)
            session.post(url + "/predict", files={"file": ("x.jpg", image)}, data=form)
        library, gateway = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            runner.caption_pixels(load_image(image, runner.image_size)[None], beam_size=3)
            library.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert session.post(url + "/predict", files={"file": ("x.jpg", image)}, data=form).status_code == 200
            gateway.append(time.perf_counter() - start)
        results["overhead"] = {"library_p50_ms": round(statistics.median(library) * 1000, 2),
                               "gateway_p50_ms": round(statistics.median(gateway) * 1000, 2),
                               "ratio": round(statistics.median(gateway) / statistics.median(library), 3)}
        print("overhead", json.dumps(results["overhead"]), flush=True)
        del runner

        # 2. concurrency; the 16-client run is the soak
        results["load"] = []
        for clients in (1, 4):
            results["load"].append(load(url, image, clients, args.seconds, form))
            print("load", json.dumps(results["load"][-1]), flush=True)
        rss_before = rss_kib(server.pid)
        soak = load(url, image, 16, args.soak, form)
        rss_after = rss_kib(server.pid)
        soak.update(rss_before_kib=rss_before, rss_after_kib=rss_after,
                    rss_growth=round(rss_after / rss_before - 1, 4))
        results["load"].append(soak)
        print("soak", json.dumps(soak), flush=True)

        # 3. a new version during load
        outcome: dict = {}

        def swap():
            time.sleep(3)
            copy = Path(tempfile.mkdtemp(prefix="bench-v2-")) / "saved_model"
            shutil.copytree(args.saved_model, copy)
            (copy / "assets.extra" / "bench-marker").write_text("v2")
            version = repo.publish("captioner", copy, {"metrics": {}})
            registered = time.monotonic()
            while requests.get(url + "/model/info", timeout=5).json()["version"] != str(version):
                time.sleep(0.1)
            outcome["visible_after_s"] = round(time.monotonic() - registered, 2)

        swapper = threading.Thread(target=swap)
        swapper.start()
        during = load(url, image, 4, max(20.0, args.seconds), form)
        swapper.join()
        results["hot_swap"] = {**outcome, "requests": during["requests"], "errors": during["errors"]}
        print("hot swap", json.dumps(results["hot_swap"]), flush=True)

        # 4. fuzz
        statuses: dict[str, int] = {}
        for name, data in fuzz_payloads(args.fuzz, seed=11):
            try:
                status = str(session.post(url + "/predict", files={"file": (name, data)},
                                          data={"algorithm": "greedy", "max_length": "5"}, timeout=60).status_code)
            except requests.RequestException:
                status = "connection-error"
            statuses[status] = statuses.get(status, 0) + 1
        alive = requests.get(url + "/health", timeout=5).status_code == 200
        results["fuzz"] = {"payloads": args.fuzz, "statuses": statuses,
                           "server_errors": sum(n for s, n in statuses.items() if not s.isdigit() or int(s) >= 500),
                           "alive_after": alive}
        print("fuzz", json.dumps(results["fuzz"]), flush=True)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(repo_dir, ignore_errors=True)
    out = Path(__file__).resolve().parent / "results" / f"gateway-{results['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
