"""The pretraining corpus of the embedded tiny model: the docstrings of a fixed list of Python standard-library
modules. They are on every machine that runs Python, need no download, and hold real English, code and doctest
arithmetic (``>>> 2 + 3`` / ``5``), enough general structure for a few-million-parameter model.

The docstrings are read in a fresh, isolated interpreter: a running process may have patched the standard library
(pytest replaces ``threading.excepthook``, for one), and the corpus — hence the model and its cache key — must not
depend on who asks.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import subprocess
import sys

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


def _read_docstrings(modules: tuple[str, ...]) -> list[str]:
    """Every distinct docstring of ``modules`` and their members, in a fixed order, as this interpreter sees them."""
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


@functools.cache
def _docstrings_in_fresh_interpreter(modules: tuple[str, ...]) -> tuple[str, ...]:
    # -I: no user site, no environment variables, no script directory on sys.path; this file needs only the stdlib.
    run = subprocess.run(
        [sys.executable, "-I", __file__, *modules], capture_output=True, text=True, encoding="utf-8", check=False
    )
    if run.returncode != 0:
        raise RuntimeError(f"reading the docstring corpus failed:\n{run.stderr[-2000:]}")
    return tuple(json.loads(run.stdout))


def docstring_corpus(modules: tuple[str, ...] = MODULES) -> list[str]:
    """Every distinct docstring of ``modules`` and their members, in a fixed order (one string each), read in a
    fresh interpreter so that it is the same whatever the calling process imported or patched."""
    return list(_docstrings_in_fresh_interpreter(tuple(modules)))


def corpus_fingerprint(docs: list[str]) -> str:
    """A short hash of the corpus text: part of the cache key, so another Python version builds its own model."""
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()[:12]


if __name__ == "__main__":
    print(json.dumps(_read_docstrings(tuple(sys.argv[1:]))))
