"""Which module of a transformer block plays which S2FT role, and the attention head geometry.

Roles: ``o`` (attention output projection: trains the selected heads' input columns), ``v`` (value projection:
the matching rows), ``down`` (FFN down projection: the selected channels' input columns) and ``up`` / ``gate``
(the matching rows). Known architectures are read from the model config; ``module_roles`` covers any other.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("o", "v", "down", "up", "gate")
# Logical axis each role slices: "in" = input features (columns of W (out, in)), "out" = output features (rows).
ROLE_AXIS = {"o": "in", "v": "out", "down": "in", "up": "out", "gate": "out"}
HEAD_ROLES = ("o", "v")
CHANNEL_ROLES = ("down", "up", "gate")

_LLAMA_LIKE = {
    "o": "self_attn.o_proj",
    "v": "self_attn.v_proj",
    "down": "mlp.down_proj",
    "up": "mlp.up_proj",
    "gate": "mlp.gate_proj",
}
_BERT_LIKE = {
    "o": "attention.output.dense",
    "v": "attention.self.value",
    "down": "output.dense",
    "up": "intermediate.dense",
}
KNOWN_ROLES: dict[str, dict[str, str]] = {
    **{
        name: _LLAMA_LIKE
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
    },
    "gpt2": {"o": "attn.c_proj", "v": "attn.c_attn", "down": "mlp.c_proj", "up": "mlp.c_fc"},
    **{name: _BERT_LIKE for name in ("bert", "roberta", "xlm-roberta")},
}


class UnknownArchitectureError(ValueError):
    """S2FT cannot tell module roles or head geometry for this model; pass ``module_roles`` and head sizes."""


@dataclass(frozen=True)
class Architecture:
    """Module roles (role -> module-name suffix) and head geometry of one model."""

    roles: dict[str, str]
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    value_offset: int = 0  # first output row of v inside a fused q|k|v projection (GPT-2 ``c_attn``)

    def role_of(self, module_name: str) -> str | None:
        """The role whose suffix matches ``module_name`` (the longest one wins: BERT's two ``output.dense``)."""
        best, best_len = None, -1
        for role, suffix in self.roles.items():
            if (module_name == suffix or module_name.endswith("." + suffix)) and len(suffix) > best_len:
                best, best_len = role, len(suffix)
        return best

    def block_of(self, module_name: str, role: str) -> str:
        """The block a module belongs to: its name without the role suffix."""
        return module_name[: -len(self.roles[role])].rstrip(".")

    def kv_head(self, head: int) -> int:
        """The key/value head a query head reads (GQA/MQA)."""
        return head // (self.num_heads // self.num_kv_heads)


def _config_get(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_architecture(
    model_config: object | None,
    module_roles: dict[str, str] | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
) -> Architecture:
    """Roles and head geometry from the model config, with explicit overrides taking precedence."""
    model_type = getattr(model_config, "model_type", None)
    if module_roles:
        unknown = set(module_roles) - set(ROLES)
        if unknown:
            raise ValueError(f"s2ft module_roles: unknown roles {sorted(unknown)}; roles are {list(ROLES)}.")
        roles = dict(module_roles)
    elif model_type in KNOWN_ROLES:
        roles = dict(KNOWN_ROLES[model_type])
    else:
        raise UnknownArchitectureError(
            f"S2FT does not know the module roles of model_type={model_type!r} (known: "
            f"{sorted(KNOWN_ROLES)}). Pass S2FTConfig(module_roles={{'o': ..., 'v': ..., 'down': ..., 'up': ...}}) "
            "mapping roles to module-name suffixes, and num_attention_heads/head_dim if you map 'o' or 'v'."
        )
    if not any(role in roles for role in HEAD_ROLES):
        return Architecture(roles=roles)
    heads = num_attention_heads or _config_get(model_config, "num_attention_heads", "n_head")
    kv_heads = num_key_value_heads or _config_get(model_config, "num_key_value_heads") or heads
    hidden = _config_get(model_config, "hidden_size", "n_embd")
    dim = head_dim or _config_get(model_config, "head_dim") or (hidden // heads if heads and hidden else None)
    if not heads or not dim:
        raise UnknownArchitectureError(
            f"S2FT cannot tell the attention head geometry of model_type={model_type!r}: pass "
            "S2FTConfig(num_attention_heads=..., head_dim=...) or map only FFN roles in module_roles."
        )
    if heads % kv_heads:
        raise UnknownArchitectureError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}."
        )
    offset = 2 * heads * dim if model_type == "gpt2" and not module_roles else 0
    return Architecture(roles=roles, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, value_offset=offset)
