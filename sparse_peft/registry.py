"""Register sparse-peft's methods with the installed PEFT.

PEFT 0.21 has no plugin discovery: ``register_peft_method`` only accepts names that already exist in the
``PeftType`` enum. This module is the single place that extends the enum and registers every method, so that
``import sparse_peft`` is all a user needs before ``get_peft_model`` / ``PeftModel.from_pretrained``.
Registration is idempotent (importing twice, or reloading, is harmless).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from importlib import import_module

import peft
from packaging.version import Version

SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))
"""Half-open range [low, high) of PEFT versions whose internals this module was written against."""

PEFT_TYPE_NAMES = ("SPARSE_DELTA", "SORA", "S2FT", "GROUP_SPARSE_LORA")


class UnsupportedPeftVersionError(ImportError):
    """Raised when the installed PEFT's internals differ from what the registration relies on."""


@dataclass(frozen=True)
class MethodSpec:
    """Where one method's config and tuner classes live."""

    name: str  # lower-case PEFT method name, e.g. "sparse_delta"
    module: str  # module exporting both classes
    config_cls: str
    model_cls: str

    @property
    def prefix(self) -> str:
        return self.name + "_"


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("sparse_delta", "sparse_peft.tuners.sparse_delta", "SparseDeltaConfig", "SparseDeltaModel"),
    MethodSpec("sora", "sparse_peft.tuners.sora", "SoraConfig", "SoraModel"),
    MethodSpec("s2ft", "sparse_peft.tuners.s2ft", "S2FTConfig", "S2FTModel"),
    MethodSpec(
        "group_sparse_lora",
        "sparse_peft.tuners.group_sparse_lora",
        "GroupSparseLoraConfig",
        "GroupSparseLoraModel",
    ),
)


def _fail(reason: str) -> None:
    low, high = SUPPORTED_PEFT
    raise UnsupportedPeftVersionError(
        f"sparse-peft supports peft>={low},<{high}; the installed peft {peft.__version__} {reason}. "
        f"Install a supported version: pip install 'peft>={low},<{high}'."
    )


def check_peft_version() -> None:
    """Fail early, naming the supported versions, if PEFT is outside the tested range or lacks the hooks we use."""
    installed = Version(peft.__version__)
    low, high = SUPPORTED_PEFT
    if not (low <= Version(installed.base_version) < high):
        _fail("is outside that range")
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: F401
        from peft.utils import PeftType, register_peft_method  # noqa: F401
    except ImportError as err:  # pragma: no cover - only with a broken PEFT
        _fail(f"does not provide the registration API ({err})")


def _extend_peft_type_enum(names: tuple[str, ...]) -> None:
    """Add members to ``peft.utils.PeftType`` in place (a ``str`` enum, so members compare equal to their names)."""
    from peft.utils import PeftType

    for name in names:
        if name in PeftType.__members__:
            continue
        member = str.__new__(PeftType, name)
        member._name_ = name
        member._value_ = name
        member.__objclass__ = PeftType
        # enum internals: keep these three views consistent so lookup by name and by value both work
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        PeftType._member_names_.append(name)
        type.__setattr__(PeftType, name, member)
    if any(getattr(PeftType, n, None) is None or PeftType(n).value != n for n in names):
        _fail("has a PeftType enum that could not be extended")
    if not isinstance(PeftType.SPARSE_DELTA, enum.Enum):  # pragma: no cover - defensive
        _fail("has a PeftType that is not an Enum")


def register_all() -> None:
    """Extend ``PeftType`` and register every method; safe to call any number of times."""
    check_peft_version()
    _extend_peft_type_enum(PEFT_TYPE_NAMES)

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType, register_peft_method

    for spec in METHODS:
        peft_type = PeftType[spec.name.upper()]
        if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
            continue
        module = import_module(spec.module)
        register_peft_method(
            name=spec.name,
            config_cls=getattr(module, spec.config_cls),
            model_cls=getattr(module, spec.model_cls),
            prefix=spec.prefix,
        )
