"""Configuration of sparse high-rank deltas (SHiRA / SpIEL / LT-SFT style)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from .adapter_file import remember_weights_file

SELECTIONS = ("random", "magnitude", "gradient", "snip")
RESELECT_SCHEDULES = ("linear", "cosine", "constant")
REGROW_CRITERIA = ("gradient", "momentum")
DEFAULT_DENSITY = 0.01


def entries_for_density(density: float, numel: int) -> int:
    """How many entries ``density`` of ``numel`` is: rounded, at least one, at most all."""
    return max(1, min(numel, round(density * numel)))


@dataclass
class SparseDeltaConfig(PeftConfig):
    """Train a fixed number of individual weight entries per targeted matrix: ``W' = W + Δ``.

    Δ is stored as sorted unique flat indices (row-major in the weight's storage layout, int32 where they fit)
    plus one value per index. Give the budget as ``density`` (fraction of each matrix) or as a LoRA-equivalent
    ``r`` (``r * (in + out)`` entries per matrix), not both; with neither, ``density=0.01``.

    ``selection`` picks the entries: ``random`` (seeded), ``magnitude`` (largest ``|W|``), ``gradient``
    (largest accumulated ``|dL/dW|``) or ``snip`` (largest ``|W * dL/dW|``). The last two need calibration
    batches: call :func:`sparse_peft.select_masks` before training (training refuses to start otherwise).

    ``fused=True`` runs one active adapter on a non-quantized layer as the base layer's dense matmul with the delta
    written into the weight only for the duration of the forward/backward kernels (O(k) write and bit-exact
    restore), so it trains at LoRA's speed and memory and the base weight never holds the delta outside them.

    Args:
        target_modules (`list[str] | str | None`, *optional*, defaults to `None`):
            Module names or a regex to adapt, or 'all-linear'. Only linear-like layers are supported.
        exclude_modules (`list[str] | str | None`, *optional*, defaults to `None`):
            Module names or a regex to leave alone.
        layers_to_transform (`list[int] | int | None`, *optional*, defaults to `None`):
            Only adapt these layer indices (needs a layer pattern the model uses).
        layers_pattern (`list[str] | str | None`, *optional*, defaults to `None`):
            Name of the ModuleList holding the layers, e.g. 'layers' or 'h'.
        density (`float | None`, *optional*, defaults to `None`):
            Fraction of each targeted weight matrix to train, in (0, 1].
        r (`int | None`, *optional*, defaults to `None`):
            LoRA-equivalent budget: r * (in_features + out_features) trainable entries per matrix.
        selection (`Literal['random', 'magnitude', 'gradient', 'snip']`, *optional*, defaults to `'random'`):
            How entries are chosen, one of ('random', 'magnitude', 'gradient', 'snip').
        block_size (`int`, *optional*, defaults to `1`):
            Choose entries in aligned blocks of this many consecutive entries of the flat weight (scored by their
            sum), the budget rounded to whole blocks. 16 fp32 entries fill one 64-byte cache line: a switch, merge
            or load then touches only the lines it changes (about ``density`` of the weight instead of most of it)
            and a file stores one index per block. Static masks only (dynamic reselection moves single entries).
        init_weights (`bool`, *optional*, defaults to `True`):
            Start the delta at zero (True). False draws random values; only useful for tests.
        fan_in_fan_out (`bool`, *optional*, defaults to `False`):
            Weights stored (in, out) as in GPT-2's Conv1D; detected automatically for Conv1D.
        fused (`bool`, *optional*, defaults to `True`):
            Run one active adapter as the base layer's dense matmul (delta written in transiently).
        seed (`int`, *optional*, defaults to `0`):
            Seed for random selection and non-zero init.
        l1_lambda (`float`, *optional*, defaults to `0.0`):
            LT-SFT's L1 pull towards the base: after each optimizer step the values are soft-thresholded by lr
            * l1_lambda, so deltas stay small and composable (0: off).
        reselect_every (`int | None`, *optional*, defaults to `None`):
            Dynamic mask (SpIEL): prune and regrow every this many optimizer steps; None = static.
        reselect_fraction (`float`, *optional*, defaults to `0.2`):
            Fraction of each layer's entries replaced at a reselection, before decay.
        reselect_schedule (`Literal['linear', 'cosine', 'constant']`, *optional*, defaults to `'linear'`):
            How the replaced fraction decays to 0 over training, ('linear', 'cosine', 'constant').
        reselect_first_full (`bool`, *optional*, defaults to `False`):
            Replace every entry at the first reselection (SpIEL's warm start).
        reselect_total_steps (`int | None`, *optional*, defaults to `None`):
            Steps over which the fraction decays (default: the Trainer's max_steps).
        regrow (`Literal['gradient', 'momentum']`, *optional*, defaults to `'gradient'`):
            Regrow by accumulated |grad| of candidates, or by SM3-style row/column accumulators.
        regrow_window (`int`, *optional*, defaults to `5`):
            Steps before each reselection whose gradients score the regrowth candidates.
        modules_to_save (`list[str] | None`, *optional*, defaults to `None`):
            Other modules to train fully and save with the adapter.

    Example:

    ```py
    >>> import sparse_peft
    >>> from peft import get_peft_model
    >>> config = sparse_peft.SparseDeltaConfig(target_modules="all-linear", r=8, selection="gradient")
    >>> model = get_peft_model(base_model, config)
    >>> sparse_peft.select_masks(model, calibration_batches)  # gradient / snip selections only
    ```
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt, or 'all-linear'. Only linear-like layers are supported."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only adapt these layer indices (needs a layer pattern the model uses)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the ModuleList holding the layers, e.g. 'layers' or 'h'."}
    )
    density: float | None = field(
        default=None, metadata={"help": "Fraction of each targeted weight matrix to train, in (0, 1]."}
    )
    r: int | None = field(
        default=None,
        metadata={
            "help": "LoRA-equivalent budget: r * (in_features + out_features) trainable entries per matrix."
        },
    )
    selection: Literal["random", "magnitude", "gradient", "snip"] = field(
        default="random", metadata={"help": f"How entries are chosen, one of {SELECTIONS}."}
    )
    block_size: int = field(
        default=1,
        metadata={
            "help": "Choose entries in aligned blocks of this many consecutive entries (16 fp32 = one cache line): "
            "faster switching, merging and loading; static masks only."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "Start the delta at zero (True). False draws random values; only useful for tests."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "Weights stored (in, out) as in GPT-2's Conv1D; detected automatically for Conv1D."
        },
    )
    fused: bool = field(
        default=True,
        metadata={"help": "Run one active adapter as the base layer's dense matmul (delta written in transiently)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for random selection and non-zero init."})
    l1_lambda: float = field(
        default=0.0,
        metadata={"help": "LT-SFT's L1 pull towards the base: after each optimizer step the values are "
                  "soft-thresholded by lr * l1_lambda, so deltas stay small and composable (0: off)."},
    )
    reselect_every: int | None = field(
        default=None,
        metadata={
            "help": "Dynamic mask (SpIEL): prune and regrow every this many optimizer steps; None = static."
        },
    )
    reselect_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction of each layer's entries replaced at a reselection, before decay."},
    )
    reselect_schedule: Literal["linear", "cosine", "constant"] = field(
        default="linear",
        metadata={"help": f"How the replaced fraction decays to 0 over training, {RESELECT_SCHEDULES}."},
    )
    reselect_first_full: bool = field(
        default=False, metadata={"help": "Replace every entry at the first reselection (SpIEL's warm start)."}
    )
    reselect_total_steps: int | None = field(
        default=None,
        metadata={"help": "Steps over which the fraction decays (default: the Trainer's max_steps)."},
    )
    regrow: Literal["gradient", "momentum"] = field(
        default="gradient",
        metadata={
            "help": "Regrow by accumulated |grad| of candidates, or by SM3-style row/column accumulators."
        },
    )
    regrow_window: int = field(
        default=5,
        metadata={"help": "Steps before each reselection whose gradients score the regrowth candidates."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Other modules to train fully and save with the adapter."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SPARSE_DELTA
        if isinstance(self.target_modules, list | tuple | set):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list | tuple | set):
            self.exclude_modules = set(self.exclude_modules)
        if self.density is not None and self.r is not None:
            raise ValueError("SparseDeltaConfig: give either `density` or `r`, not both.")
        if self.density is None and self.r is None:
            self.density = DEFAULT_DENSITY
        if self.density is not None and not (
            isinstance(self.density, int | float)
            and not isinstance(self.density, bool)
            and 0 < self.density <= 1
        ):
            raise ValueError(
                f"SparseDeltaConfig: `density` must be a number in (0, 1], got {self.density!r}."
            )
        if self.r is not None and not (
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0
        ):
            raise ValueError(f"SparseDeltaConfig: `r` must be a positive integer, got {self.r!r}.")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"SparseDeltaConfig: `selection` must be one of {SELECTIONS}, got {self.selection!r}."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"SparseDeltaConfig: `seed` must be an integer, got {self.seed!r}.")
        self._check_dynamic()
        if not (isinstance(self.block_size, int) and not isinstance(self.block_size, bool) and self.block_size > 0):
            raise ValueError(f"SparseDeltaConfig: `block_size` must be a positive integer, got {self.block_size!r}.")
        if self.block_size > 1 and self.is_dynamic:
            raise ValueError(
                "SparseDeltaConfig: dynamic masks (`reselect_every`) move single entries; use `block_size=1` with "
                f"them, got block_size={self.block_size}."
            )
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError(
                "SparseDeltaConfig: `layers_pattern` only makes sense with `layers_to_transform`."
            )

    def _check_dynamic(self) -> None:
        def positive_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        if isinstance(self.l1_lambda, bool) or not isinstance(self.l1_lambda, int | float) or self.l1_lambda < 0:
            raise ValueError(f"SparseDeltaConfig: `l1_lambda` must be a number >= 0, got {self.l1_lambda!r}.")
        if self.reselect_every is not None and not positive_int(self.reselect_every):
            raise ValueError(
                f"SparseDeltaConfig: `reselect_every` must be a positive integer or None, got "
                f"{self.reselect_every!r}."
            )
        if not (isinstance(self.reselect_fraction, int | float) and 0 <= self.reselect_fraction <= 1):
            raise ValueError(
                f"SparseDeltaConfig: `reselect_fraction` must be in [0, 1], got {self.reselect_fraction!r}."
            )
        if self.reselect_schedule not in RESELECT_SCHEDULES:
            raise ValueError(
                f"SparseDeltaConfig: `reselect_schedule` must be one of {RESELECT_SCHEDULES}, got "
                f"{self.reselect_schedule!r}."
            )
        if self.regrow not in REGROW_CRITERIA:
            raise ValueError(
                f"SparseDeltaConfig: `regrow` must be one of {REGROW_CRITERIA}, got {self.regrow!r}."
            )
        if not positive_int(self.regrow_window):
            raise ValueError(
                f"SparseDeltaConfig: `regrow_window` must be a positive integer, got {self.regrow_window!r}."
            )
        if self.reselect_total_steps is not None and not positive_int(self.reselect_total_steps):
            raise ValueError(
                f"SparseDeltaConfig: `reselect_total_steps` must be a positive integer or None, got "
                f"{self.reselect_total_steps!r}."
            )

    @property
    def is_dynamic(self) -> bool:
        return self.reselect_every is not None

    def replace_fraction(self, step: int, total_steps: int | None, first: bool) -> float:
        """Fraction of entries to replace at the reselection after ``step`` completed optimizer steps."""
        if first and self.reselect_first_full:
            return 1.0
        total = self.reselect_total_steps or total_steps
        if self.reselect_schedule == "constant" or not total:
            return float(self.reselect_fraction)
        progress = min(max(step / total, 0.0), 1.0)
        if self.reselect_schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return float(self.reselect_fraction) * decay

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's, noting the local weights file next to the config: the injection that follows (``PeftModel.
        from_pretrained``, ``load_adapter``) takes the supports from it and refuses a file that does not fit the
        model before anything stays wrapped or registered (see ``adapter_file``)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        remember_weights_file(config, pretrained_model_name_or_path, subfolder)
        return config

    def budget(self, n_rows: int, n_cols: int) -> int:
        """Number of trainable entries for one ``n_rows x n_cols`` matrix (whole blocks of ``block_size``)."""
        numel = n_rows * n_cols
        if self.r is not None:
            k = self.r * (n_rows + n_cols)
            if k > numel:
                raise ValueError(
                    f"SparseDeltaConfig: r={self.r} asks for {k} entries but a {n_rows}x{n_cols} matrix has only "
                    f"{numel}; lower `r` or use `density`."
                )
        else:
            k = entries_for_density(float(self.density), numel)
        if self.block_size == 1:
            return k
        blocks = numel // self.block_size
        if blocks == 0:
            raise ValueError(
                f"SparseDeltaConfig: block_size={self.block_size} is larger than a {n_rows}x{n_cols} matrix; lower "
                "`block_size` or exclude the module."
            )
        return self.block_size * max(1, min(blocks, round(k / self.block_size)))
