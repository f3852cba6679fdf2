"""PEFT's own generic tuner tests, fetched from its source distribution and retargeted at our configs.

PEFT ships its test-suite only in the sdist, and we do not copy it into this repository. Instead the sdist of the
*installed* PEFT version is downloaded once into ``.cache/peft-src/`` (git-ignored) by the test set-up::

    python -m tests.peft_upstream --fetch        # pip download --no-binary :all: --no-deps peft==<installed>

:func:`import_tests` then imports PEFT's ``tests/`` directory as the package ``peft_upstream_tests`` (its modules
use relative imports), and :func:`retarget` builds a subclass of an upstream test class whose parametrized methods
run our own cases instead of upstream's. Adapter types other than SPARSE_DELTA reuse both functions.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "peft-src"
PACKAGE = "peft_upstream_tests"
FETCH_COMMAND = "python -m tests.peft_upstream --fetch"


class UpstreamTestsMissingError(RuntimeError):
    """PEFT's test-suite for the installed version has not been fetched."""


def peft_version() -> str:
    return importlib.metadata.version("peft")


def source_dir(version: str | None = None) -> Path:
    """Where the sdist of ``version`` (default: the installed PEFT) is extracted."""
    return CACHE_DIR / f"peft-{version or peft_version()}"


def tests_dir() -> Path:
    """PEFT's ``tests/`` directory for the installed version; a clear error (not a skip) when it is missing."""
    path = Path(os.environ.get("PEFT_UPSTREAM_TESTS", source_dir() / "tests"))
    if not (path / "testing_common.py").is_file():
        raise UpstreamTestsMissingError(
            f"PEFT's own test-suite for peft=={peft_version()} was not found at {path}. Fetch it (once) with "
            f"`{FETCH_COMMAND}` from the repository root, or point PEFT_UPSTREAM_TESTS at a PEFT checkout's tests/."
        )
    return path


def fetch(force: bool = False) -> Path:
    """Download the sdist of the installed PEFT with pip and extract its ``tests/`` into :data:`CACHE_DIR`."""
    version = peft_version()
    target = source_dir(version)
    if (target / "tests" / "testing_common.py").is_file() and not force:
        return target / "tests"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             f"peft=={version}", "-d", tmp],
            check=True,
        )
        archives = list(Path(tmp).glob("peft-*.tar.gz"))
        if len(archives) != 1:
            raise UpstreamTestsMissingError(f"pip download gave {archives}, expected one peft sdist")
        prefix = f"peft-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not members:
                raise UpstreamTestsMissingError(f"the peft {version} sdist has no {prefix} directory")
            archive.extractall(CACHE_DIR, members=members, filter="data")
    return tests_dir()


def import_tests(module: str = "test_custom_models") -> types.ModuleType:
    """Import one of PEFT's test modules (e.g. ``test_custom_models``) from the fetched sdist."""
    path = tests_dir()
    package = sys.modules.get(PACKAGE)
    if package is None:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(path)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{module}")


# ------------------------------------------------------------------ retargeting upstream test classes
def _argnames(mark: pytest.Mark) -> str:
    names = mark.args[0]
    names = names.split(",") if isinstance(names, str) else names
    return ",".join(n.strip() for n in names)


def _rewrap(func: Callable, marks: list[pytest.Mark]) -> Callable:
    """A copy of ``func`` carrying ``marks`` (``__wrapped__`` keeps the signature, hence fixtures like tmp_path)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    wrapper.pytestmark = marks
    return wrapper


def _skipped(reason: str) -> Callable:
    @pytest.mark.skip(reason=reason)
    def test(self: Any) -> None:  # pragma: no cover - never runs
        pass

    return test


def retarget(
    upstream_cls: type,
    name: str,
    cases: Mapping[str, Sequence[Any]],
    not_applicable: Mapping[str, str],
    ids: Callable[[Any], str] | None = None,
    module: str | None = None,
) -> type:
    """Subclass ``upstream_cls`` so that its tests run on our cases instead of upstream's.

    ``cases`` maps a parametrize argnames string (e.g. ``"test_name,model_id,config_cls,config_kwargs"`` or
    ``"config_cls"``) to our values for it. Every upstream ``test_*`` method with such a parametrize mark is
    re-parametrized (its other marks and fixtures are kept). Methods named in ``not_applicable`` are replaced by a
    skipped test carrying the reason. The remaining methods are hard-wired to upstream tuners (no parametrize over
    the config) and are not collected. ``ids(value)`` names one parameter set. The returned class records the three groups in ``upstream_retargeted``,
    ``upstream_not_applicable`` and ``upstream_hardwired``.
    """
    test_names = sorted(n for n in dir(upstream_cls) if n.startswith("test_") and callable(getattr(upstream_cls, n)))
    unknown = set(not_applicable) - set(test_names)
    if unknown:
        raise ValueError(f"not_applicable names tests that {upstream_cls.__name__} does not have: {sorted(unknown)}")
    attrs: dict[str, Any] = {"__module__": module or sys._getframe(1).f_globals.get("__name__", __name__)}
    retargeted, hardwired = [], []
    for test in test_names:
        if test in not_applicable:
            attrs[test] = _skipped(f"not applicable: {not_applicable[test]}")
            continue
        func = getattr(upstream_cls, test)
        marks, replaced = [], False
        for mark in getattr(func, "pytestmark", []):
            if mark.name == "parametrize" and _argnames(mark) in cases:
                values = list(cases[_argnames(mark)])
                kwargs = {k: v for k, v in mark.kwargs.items() if k != "ids"}
                kwargs["ids"] = [ids(v) for v in values] if ids else None
                mark = pytest.mark.parametrize(mark.args[0], values, **kwargs).mark
                replaced = True
            marks.append(mark)
        if replaced:
            attrs[test] = _rewrap(func, marks)
            retargeted.append(test)
        else:
            attrs[test] = None  # hard-wired to an upstream tuner: not collected
            hardwired.append(test)
    attrs.update(
        upstream_retargeted=tuple(retargeted),
        upstream_not_applicable=dict(not_applicable),
        upstream_hardwired=tuple(hardwired),
    )
    return type(name, (upstream_cls,), attrs)


def case_id(value: object) -> str:
    """Readable parameter ids: the case name for rows, the class name for configs."""
    if isinstance(value, tuple):
        return value[0].replace(" ", "-")
    return value.__name__ if isinstance(value, type) else type(value).__name__


def retarget_custom_models(
    prefix: str,
    config_cls: type,
    test_cases: Sequence[tuple],
    multiple_active_cases: Sequence[tuple],
    config0: Any,
    not_applicable: Mapping[str, str] | None = None,
) -> tuple[type, type]:
    """PEFT's ``TestPeftCustomModel`` and ``TestMultipleActiveAdapters`` (``tests/test_custom_models.py``) on our
    cases: returns ``Test<prefix>CustomModels`` and ``Test<prefix>MultipleActiveAdapters`` for the caller's module.

    ``test_cases`` rows are upstream's ``(test_name, model_id, config_cls, config_kwargs)``,
    ``multiple_active_cases`` rows ``(test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2)``;
    ``not_applicable`` maps upstream tests to the reason they are skipped."""
    upstream = import_tests("test_custom_models")
    cases = {
        "test_name,model_id,config_cls,config_kwargs": test_cases,
        "test_name,tuner_method,config_cls,config_kwargs_1,config_kwargs_2": multiple_active_cases,
        "config_cls": [config_cls],
        "config0": [config0],
    }
    caller = sys._getframe(1).f_globals.get("__name__", __name__)
    made = []
    for upstream_cls, suffix in ((upstream.TestPeftCustomModel, "CustomModels"),
                                 (upstream.TestMultipleActiveAdapters, "MultipleActiveAdapters")):
        skips = {test: reason for test, reason in (not_applicable or {}).items() if hasattr(upstream_cls, test)}
        made.append(retarget(upstream_cls, f"Test{prefix}{suffix}", cases, skips, ids=case_id, module=caller))
    return made[0], made[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch", action="store_true", help="download and extract the sdist if it is missing")
    parser.add_argument("--force", action="store_true", help="with --fetch: download again even if present")
    args = parser.parse_args(argv)
    try:
        path = fetch(force=args.force) if args.fetch else tests_dir()
    except UpstreamTestsMissingError as err:
        print(err, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
