"""The sparse-peft Gradio demo: switch, compare, compose, merge and inspect adapters (``sparse-peft demo``)."""
