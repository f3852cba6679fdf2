"""The deprecation path of the pre-0.2 top-level import names ``trainers`` and ``triton_ops``.

The wheel installs them only as ``sparse_peft.trainers`` / ``sparse_peft.triton_ops`` (top-level names would collide
with other projects). In a source checkout the old names still import, from the folders of the same name: this
module makes such an import return the one real package (and its sub-modules), with a ``DeprecationWarning``,
instead of a second copy whose classes would not match the real ones.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings


def redirect(old_name: str, new_name: str) -> None:
    """Make ``import old_name`` (and ``old_name.sub``) give ``new_name``'s modules; warn once."""
    warnings.warn(
        f"`import {old_name}` is deprecated and works only in a source checkout; use `import {new_name}`",
        DeprecationWarning,
        stacklevel=3,
    )
    package = importlib.import_module(new_name)
    sys.modules[old_name] = package
    for info in pkgutil.iter_modules(package.__path__):
        try:
            sys.modules[f"{old_name}.{info.name}"] = importlib.import_module(f"{new_name}.{info.name}")
        except ImportError:  # an optional backend (Triton) that is not installed
            continue
