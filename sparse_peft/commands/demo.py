"""``sparse-peft demo``: serve the Gradio app on a directory of adapters (default: the quickstart's output)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="serve the Gradio demo: switch, compare, compose and merge adapters",
        description="Serves the demo on the adapters in DIR (the quickstart's output by default).",
    )
    demo.add_argument("--adapters", default="quickstart-out", help="adapter directory (default: ./quickstart-out)")
    demo.add_argument("--model", default=None, help="base model id or path (default: from the manifest/adapters)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    demo.add_argument("--port", type=_port, default=7860, help="port (default: 7860)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not Path(args.adapters).is_dir():
        print(
            f"sparse-peft demo: adapter directory {args.adapters!r} does not exist; run `sparse-peft quickstart` "
            "first or pass --adapters DIR.",
            file=sys.stderr,
        )
        return 2
    from sparse_peft.demo.app import serve

    print(f"Serving the demo on http://{args.host}:{args.port} (Ctrl+C to stop) ...", flush=True)
    serve(args.adapters, args.model, args.host, args.port)
    return 0
