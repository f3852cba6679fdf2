"""Load test of the demo server: many concurrent users, each with their own adapter, on loopback.

``python -m benchmarks.demo_load [--adapters DIR] [--clients 8] [--requests 32]`` serves the demo (``sparse-peft
demo``'s app) on the embedded model with one sparse adapter per skill, first answers every request alone (one
client: the single-user answers), then sends the same requests from ``--clients`` concurrent ``gradio_client``
clients. Greedy requests that arrive together are answered in one mixed-adapter batch (``demo/batching.py``).
Reports requests/s for both, the batch sizes seen, and how many concurrent answers differ from the single-user ones
(the target: zero). ``--adapters``: a folder of adapters with a ``manifest.json`` (default: the quickstart's
output ``quickstart-out``).
"""

from __future__ import annotations

import argparse
import random
import re
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.report import save_section

OUT = Path(__file__).resolve().parents[1] / "docs" / "demo_load.json"


def measure(adapters: Path, clients: int, requests: int, max_new_tokens: int) -> dict:
    import json

    from gradio_client import Client
    from sparse_peft.demo.app import build_app

    manifest = json.loads((adapters / "manifest.json").read_text())
    names = list(manifest.get("adapters", {}))
    prompt = manifest.get("example_prompt")
    if not names or not prompt:
        raise SystemExit(f"{adapters}/manifest.json names no adapters or no example prompt.")
    rng = random.Random(0)
    # one prompt for every adapter: concurrent requests share a length, so they can share a batch
    jobs = [(prompt, rng.choice(names)) for _ in range(requests)]
    app = build_app(adapters)
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        client = Client(url, verbose=False)

        def ask(job: tuple[str, str]) -> tuple[str, str]:
            prompt, name = job
            _, text, info = client.predict(prompt, name, max_new_tokens, False, 1.0, 1.0, 0, api_name="/generate")
            return text, info

        ask(jobs[0])  # warm-up
        tick = time.perf_counter()
        alone = [ask(job)[0] for job in jobs]
        alone_s = time.perf_counter() - tick
        tick = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            together = list(pool.map(ask, jobs))
        together_s = time.perf_counter() - tick
        largest = int(re.search(r"up to (\d+) requests", together[-1][1]).group(1))
    finally:
        app.close()
    wrong = sum(text != expected for (text, _), expected in zip(together, alone, strict=True))
    return {
        "adapters": names, "clients": clients, "requests": requests, "max_new_tokens": max_new_tokens,
        "alone_requests_per_s": requests / alone_s, "together_requests_per_s": requests / together_s,
        "largest_batch": largest, "wrong_answers": wrong,
    }


def render(data: dict) -> str:
    speedup = data["together_requests_per_s"] / data["alone_requests_per_s"]
    return "\n".join([
        "## Demo under load (concurrent users, one adapter each)",
        "",
        f"`{data['command']}` on {data['date']} ({data['machine']}). The demo serves {', '.join(data['adapters'])} "
        f"on the embedded model; {data['requests']} greedy requests ({data['max_new_tokens']} new tokens, base and "
        "adapter answer each), one prompt, a random adapter each (requests of one length can share a batch; the "
        "demo does not pad, so that no answer depends on who else asks).",
        "",
        "| clients | requests/s | largest batch | answers differing from the single-user ones |",
        "|---:|---:|---:|---:|",
        f"| 1 | {data['alone_requests_per_s']:.2f} | 1 | - |",
        f"| {data['clients']} | {data['together_requests_per_s']:.2f} ({speedup:.1f}x) | {data['largest_batch']} | "
        f"{data['wrong_answers']} |",
        "",
        *([data["note"], ""] if data.get("note") else []),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="quickstart-out", help="adapter folder with a manifest.json")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=32, help="requests sent (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--out", default=str(OUT), help="JSON results (default: docs/demo_load.json)")
    args = parser.parse_args(argv)
    data = measure(Path(args.adapters), args.clients, args.requests, args.max_new_tokens)
    data["command"] = shlex.join(["python", "-m", "benchmarks.demo_load", *argv])
    return save_section(data, Path(args.out), render)


if __name__ == "__main__":
    sys.exit(main())
