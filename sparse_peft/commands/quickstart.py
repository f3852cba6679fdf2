"""``sparse-peft quickstart``: the README's main job: train, evaluate, compose, merge, then serve the demo."""

from __future__ import annotations

import argparse

from . import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    quick = sub.add_parser(
        "quickstart",
        help="train, evaluate, compose, merge sparse adapters on the embedded tiny model, then serve the demo",
        description="End-to-end run on the embedded tiny model (nothing is downloaded).",
    )
    quick.add_argument(
        "--output", default="quickstart-out", help="output directory (default: ./quickstart-out)"
    )
    quick.add_argument("--steps", type=positive_int, default=400, help="training steps per skill adapter (default: 400)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    quick.add_argument("--no-demo", action="store_true", help="do not start the demo afterwards")
    quick.add_argument("--host", default="127.0.0.1", help="demo address (default: 127.0.0.1)")
    quick.add_argument("--port", type=positive_int, default=7860, help="demo port (default: 7860)")
    quick.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..quickstart import format_result, run_quickstart

    result = run_quickstart(args.output, steps=args.steps, seed=args.seed)
    print(format_result(result, args.output))
    if not args.no_demo:
        from demo.app import serve

        print(f"Serving the demo on http://{args.host}:{args.port} (Ctrl+C to stop) ...", flush=True)
        serve(args.output, host=args.host, port=args.port)
    return 0
