"""The Gradio app: one page to switch, compare, compose, merge and inspect adapters.

``build_app(adapters_dir, model)`` returns the ``gradio.Blocks``; ``serve(...)`` launches it (blocking). Every
handler turns a :class:`~demo.state.DemoError` (or any other failure) into a message on the page, so a bad
request never stops the server. Requests may run concurrently; the adapter switchers serialise model state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from sparse_peft.compose import DEFAULT_TIES_DENSITY
from sparse_peft.hotswap import BASE

from .state import COMPOSE_METHODS, DemoError, DemoState

DEFAULT_PROMPT = "w1 w2 w3"


def _error_text(exc: Exception) -> str:
    return f"**Error:** {exc}" if isinstance(exc, DemoError) else f"**Error:** {type(exc).__name__}: {exc}"


def build_app(adapters_dir: str | Path, model: str | None = None, prompt: str | None = None) -> gr.Blocks:
    """The demo on the adapters in ``adapters_dir`` (and base ``model``, else the manifest's / adapters')."""
    holder: dict[str, DemoState | None] = {"state": None}
    load_message = ""
    try:
        holder["state"] = DemoState.load(adapters_dir, model)
    except DemoError as exc:
        load_message = _error_text(exc)

    def state() -> DemoState:
        if holder["state"] is None:
            raise DemoError("Nothing is loaded: fix the directory in the Load tab.")
        return holder["state"]

    def compare(
        prompt: str, adapter: str, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, seed: int
    ) -> tuple[str, str, str]:
        try:
            s = state()
            base_text, _ = s.generate(prompt, BASE, max_new_tokens, do_sample, temperature, top_p, seed)
            text, switch_s = s.generate(prompt, adapter, max_new_tokens, do_sample, temperature, top_p, seed)
            switcher = s.switcher_for(adapter)
            if do_sample:
                info = (
                    f"Adapter **{adapter}**; switch took {switch_s * 1e3:.2f} ms "
                    f"(last switch of this model: {switcher.last_switch_s * 1e3:.2f} ms)."
                )
            else:
                sizes = [n for b in s.batchers.values() for n in b.batch_sizes]
                info = (
                    f"Adapter **{adapter}**, greedy: answered in a mixed-adapter batch (each row its own adapter, no "
                    f"weight switch); {len(sizes)} batches so far, up to {max(sizes, default=1)} requests in one."
                )
            return base_text.strip(), text.strip(), info
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            return "", "", _error_text(exc)

    def compose(
        first: str, second: str, w1: float, w2: float, name: str, method: str = "ties",
        density: float = DEFAULT_TIES_DENSITY,
    ) -> tuple[str, Any, Any, Any]:
        try:
            message = state().compose(first, second, float(w1), float(w2), name, method, float(density))
        except Exception as exc:  # noqa: BLE001
            message = _error_text(exc)
        return (message, *_dropdowns())

    def merge_save(adapter: str, out_dir: str) -> str:
        try:
            return state().merge_and_save(adapter, out_dir)
        except Exception as exc:  # noqa: BLE001
            return _error_text(exc)

    def plot(adapter: str) -> tuple[str | None, str]:
        try:
            return state().layer_plot(adapter), ""
        except Exception as exc:  # noqa: BLE001
            return None, _error_text(exc)

    def reload(directory: str, base: str) -> tuple[str, Any, Any, Any]:
        try:
            holder["state"] = DemoState.load(directory, base.strip() or None)
            message = holder["state"].summary()
        except Exception as exc:  # noqa: BLE001 - the previous state stays in use
            message = _error_text(exc)
        return (message, *_dropdowns())

    def _dropdowns() -> tuple[Any, Any, Any]:
        s = holder["state"]
        choices = s.choices if s else [BASE]
        names = s.names if s else []
        return (
            gr.update(choices=choices),
            gr.update(choices=names),
            gr.update(choices=names),
        )

    initial = holder["state"]
    first, example = initial.default_choice() if initial else (BASE, None)
    prompt = prompt or example or DEFAULT_PROMPT
    choices = initial.choices if initial else [BASE]
    names = initial.names if initial else []
    pair = initial.default_pair() if initial else (None, None)
    with gr.Blocks(title="sparse-peft demo") as app:
        gr.Markdown("# sparse-peft: switch, compare, compose and merge sparse adapters")
        status = gr.Markdown(initial.summary() if initial else load_message, elem_id="status")
        if initial and initial.results:
            with gr.Accordion("Results of the run that trained these adapters", open=True):
                gr.Markdown(initial.results, elem_id="results")
        with gr.Tab("Generate"):
            with gr.Row():
                adapter = gr.Dropdown(choices=choices, value=first, label="Adapter", elem_id="adapter")
                prompt_box = gr.Textbox(value=prompt, label="Prompt", elem_id="prompt")
            with gr.Accordion("Sampling", open=False):
                max_new = gr.Slider(1, 128, value=12, step=1, label="max new tokens")
                do_sample = gr.Checkbox(value=False, label="sample (otherwise greedy)")
                temperature = gr.Slider(0.05, 2.0, value=1.0, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, label="top-p")
                seed = gr.Number(value=0, precision=0, label="seed")
            if initial and initial.example_prompts:
                gr.Examples(
                    [[prompt, name] for name, prompt in initial.example_prompts.items() if name in choices],
                    inputs=[prompt_box, adapter],
                    label="Example prompts (one per skill adapter)",
                )
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Row():
                base_out = gr.Textbox(label="Base model", elem_id="base-output")
                adapter_out = gr.Textbox(label="Selected adapter", elem_id="adapter-output")
            info = gr.Markdown(elem_id="info")
        with gr.Tab("Compose"):
            with gr.Row():
                first_dd = gr.Dropdown(choices=names, value=pair[0], label="first")
                second_dd = gr.Dropdown(choices=names, value=pair[1], label="second")
                w1 = gr.Number(value=1.0, label="weight of first")
                w2 = gr.Number(value=1.0, label="weight of second")
            with gr.Row():
                method_dd = gr.Dropdown(
                    choices=list(COMPOSE_METHODS), value=next(iter(COMPOSE_METHODS)), label="method",
                    info=" · ".join(f"{k}: {v}" for k, v in COMPOSE_METHODS.items()), elem_id="compose-method",
                )
                density = gr.Slider(0.05, 1.0, value=DEFAULT_TIES_DENSITY, step=0.05, label="density",
                                    info="fraction of each adapter's entries kept (ties, dare_*, magnitude_prune)")
            composed_name = gr.Textbox(value="composed-demo", label="new adapter name")
            compose_btn = gr.Button("Compose")
            compose_msg = gr.Markdown()
        with gr.Tab("Merge & save"):
            out_dir = gr.Textbox(value="merged-model", label="output directory")
            merge_btn = gr.Button("Merge the selected adapter and save")
            merge_msg = gr.Markdown()
        with gr.Tab("Layers"):
            plot_btn = gr.Button("Plot the selected adapter per layer")
            plot_img = gr.Image(type="filepath", label="per-layer density / channels / rank")
            plot_msg = gr.Markdown()
        with gr.Tab("Load"):
            dir_box = gr.Textbox(value=str(adapters_dir), label="adapter directory")
            model_box = gr.Textbox(value=model or "", label="base model (id or path; empty: from the manifest)")
            load_btn = gr.Button("Load")
        inputs = [prompt_box, adapter, max_new, do_sample, temperature, top_p, seed]
        go.click(compare, inputs, [base_out, adapter_out, info], api_name="generate")
        compose_btn.click(
            compose, [first_dd, second_dd, w1, w2, composed_name, method_dd, density],
            [compose_msg, adapter, first_dd, second_dd],
            api_name="compose",
        )
        merge_btn.click(merge_save, [adapter, out_dir], merge_msg, api_name="merge_and_save")
        plot_btn.click(plot, [adapter], [plot_img, plot_msg], api_name="plot")
        load_btn.click(reload, [dir_box, model_box], [status, adapter, first_dd, second_dd], api_name="load")
    app.queue(default_concurrency_limit=8)
    return app


def serve(
    adapters_dir: str | Path, model: str | None = None, host: str = "127.0.0.1", port: int = 7860
) -> None:
    """Launch the demo and block until interrupted."""
    # quiet: no "set share=True" hint (a CLI user serves on their own address); our caller prints the URL
    build_app(adapters_dir, model).launch(server_name=host, server_port=port, show_error=True, quiet=True)
