"""The twin-adapter rule shared by every sparse-peft tuner (TRL's reference adapter)."""

from __future__ import annotations

from collections.abc import Container, Mapping

from peft import PeftConfig


def twin_adapter(
    peft_config: Mapping[str, PeftConfig], config: PeftConfig, adapter_name: str, present: Container[str]
) -> str | None:
    """An existing adapter added with this very config object, which a new adapter should start as a copy of.

    TRL's DPO/KTO/GRPO trainers create their reference adapter as ``add_adapter("ref", peft_config["default"])``
    and then copy only parameters whose names contain ``.default.``, which misses ParameterDict entries
    (``...values.default``, SoRA's ``...sora_gate.default``) and buffers (index supports moved by dynamic masks,
    loaded from a file, or composed). So an adapter added with another adapter's own config object starts as an
    exact copy of it. ``present``: the adapter names the layer at hand holds.
    """
    for name, other in peft_config.items():
        if other is config and name != adapter_name and name in present:
            return name
    return None
