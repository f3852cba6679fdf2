"""The pretraining corpus of the embedded tiny model: the docstrings of a fixed list of Python standard-library
modules. They are on every machine that runs Python, need no download, and hold real English, code and doctest
arithmetic (``>>> 2 + 3`` / ``5``), enough general structure for a few-million-parameter model."""

from __future__ import annotations

import hashlib
import importlib
import inspect

MODULES = tuple(
    """abc argparse ast asyncio.events base64 bisect calendar cmath collections configparser contextlib copy csv
    dataclasses datetime decimal difflib email.message enum fractions functools glob gzip hashlib heapq html
    http.client inspect io ipaddress itertools json logging math operator os pathlib pickle pprint queue random re
    sched secrets shlex shutil socket sqlite3 statistics string struct subprocess tarfile tempfile textwrap
    threading timeit tokenize typing unittest urllib.parse uuid warnings weakref zipfile zlib""".split()
)


def _members(module: object) -> list[object]:
    """The module's public classes and functions defined in it (and those classes' public methods), sorted by name."""
    found: list[object] = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__ and not inspect.isbuiltin(obj):
            continue
        found.append(obj)
        if inspect.isclass(obj):
            found += [
                o for a, o in sorted(vars(obj).items()) if not a.startswith("_") and inspect.isroutine(o)
            ]
    return found


def docstring_corpus(modules: tuple[str, ...] = MODULES) -> list[str]:
    """Every distinct docstring of ``modules`` and their members, in a fixed order (one string each)."""
    docs: list[str] = []
    seen: set[str] = set()
    for name in modules:
        module = importlib.import_module(name)
        for obj in [module, *_members(module)]:
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def corpus_fingerprint(docs: list[str]) -> str:
    """A short hash of the corpus text: part of the cache key, so another Python version builds its own model."""
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()[:12]
