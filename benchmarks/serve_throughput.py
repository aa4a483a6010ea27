"""Requests per second that ``espmedsam serve`` sustains with concurrent clients on loopback, and its memory.

Usage: python benchmarks/serve_throughput.py [--clients 4] [--seconds 30] [--workers 1] [--details]
       [--backend torch|openvino]
       [--out FILE]

The server is started as a user starts it (its own process, bundled weights, all cores). Each client posts
the six 512-px test images (the first test image of each in-domain set) in turn to ``/api/segment`` with
``modality=auto`` for ``--seconds``; every answer must be a 200 with a mask. The server's resident memory
is sampled every 0.2 s; its peak is the kernel's high-water mark (VmHWM). With ``--workers N`` the server
runs N model processes (``espmedsam serve --workers N``, cores / N threads each) and the memory is summed
over the server and its workers (RSS; the peak is the highest sample).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _report import cpu_description, report, tree_memory_mb
from _server import images_512, memory_mb, serve_process


def client_loop(url: str, uploads: list[tuple[str, bytes]], stop: float, details: bool, out: list) -> None:
    with httpx.Client(timeout=120) as client:
        i = 0
        while time.monotonic() < stop:
            name, data = uploads[i % len(uploads)]
            start = time.perf_counter()
            response = client.post(
                f"{url}/api/segment", files={"file": (name, data)}, data={"details": str(details).lower()}
            )
            ok = response.status_code == 200 and bool(response.json().get("slices"))
            out.append((time.perf_counter() - start, ok, response.status_code))
            i += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=1, help="espmedsam serve --workers")
    parser.add_argument("--details", action="store_true", help="ask for display images and patch maps too")
    parser.add_argument("--backend", choices=("torch", "openvino"), default="torch", help="espmedsam serve's")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        uploads = [(path.name, path.read_bytes()) for path, _ in images_512(Path(folder))]
    options = ("--backend", args.backend, *(("--workers", str(args.workers)) if args.workers > 1 else ()))
    with serve_process(*options) as (server, url):
        idle_rss = tree_memory_mb(server.pid)[0]
        for _ in range(args.workers):  # warm-up: each worker's first request (the port spreads them)
            httpx.post(f"{url}/api/segment", files={"file": uploads[0]}, timeout=120)
        results: list[list] = [[] for _ in range(args.clients)]
        samples = []
        start = time.monotonic()
        stop = start + args.seconds
        threads = [
            threading.Thread(target=client_loop, args=(url, uploads, stop, args.details, results[i]))
            for i in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            samples.append(tree_memory_mb(server.pid)[0])
            time.sleep(0.2)
        wall = time.monotonic() - start
        peak = memory_mb(server.pid)[1] if args.workers == 1 else max(samples)
    answers = [r for client in results for r in client]
    errors = [code for _, ok, code in answers if not ok]
    latencies = sorted(seconds for seconds, _, _ in answers)
    peak_kind = "VmHWM" if args.workers == 1 else "summed over the workers, max sampled"
    lines = [
        f"# espmedsam serve: {args.clients} concurrent clients for {args.seconds:.0f} s",
        "",
        f"`python benchmarks/serve_throughput.py --clients {args.clients} --seconds {args.seconds:.0f}"
        f"{f' --workers {args.workers}' if args.workers > 1 else ''}{' --details' if args.details else ''}"
        f" --backend {args.backend}`;"
        f" {cpu_description()}, "
        "bundled weights, bf16 autocast, modality auto (classifier), the six in-domain sets' first test "
        "image at 512 px (long side), loopback.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| requests answered | {len(answers)} in {wall:.1f} s |",
        f"| **requests/s** | **{len(answers) / wall:.2f}** |",
        f"| errors | {len(errors)}{' ' + str(sorted(set(errors))) if errors else ''} |",
        f"| latency median / p95 / max (s) | {statistics.median(latencies):.2f} / "
        f"{latencies[int(0.95 * (len(latencies) - 1))]:.2f} / {latencies[-1]:.2f} |",
        f"| server RSS idle (model loaded) | {idle_rss:.0f} MB |",
        f"| server RSS during the run, max sampled | {max(samples):.0f} MB |",
        f"| **server peak RSS ({peak_kind})** | **{peak:.0f} MB** |",
    ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
