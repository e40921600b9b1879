"""No code in the package loads a file in a way that can run code from it (issue 12).

Every call in ``mergetune/`` is read with ``ast`` (names resolved through the module's imports, so
``import numpy as np`` or ``from pickle import loads`` are seen for what they are) and refused when it is:

- ``pickle.load`` / ``pickle.loads`` / ``pickle.Unpickler`` (and ``dill``, ``cloudpickle``,
  ``joblib.load``, ``marshal.loads``, ``pandas.read_pickle``, ``shelve.open``): unpickling runs code;
- ``numpy.load`` with ``allow_pickle`` not literally False (its default is False);
- ``torch.load`` without ``weights_only=True``;
- ``yaml.load`` / ``yaml.load_all`` without a safe loader, and ``yaml.unsafe_load`` / ``full_load``:
  the loader must be ``yaml.SafeLoader`` / ``yaml.CSafeLoader`` or a class of the same module that
  subclasses one of them (``errors._UniqueKeyLoader``, the one the package uses).

The checker is tested on snippets first, so that a scan that finds nothing proves something.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mergetune

PACKAGE = Path(mergetune.__file__).parent
ALWAYS_UNSAFE = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "pandas.read_pickle",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (at any depth)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                head = alias.name.split(".")[0]  # ``import a.b`` binds ``a``
                names[alias.asname or head] = alias.name if alias.asname else head
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load`` (None for anything but a chain of names)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _safe_loader_classes(tree: ast.Module, aliases: dict[str, str]) -> set[str]:
    """Classes of this module that subclass a safe YAML loader (directly or through another such class)."""
    safe = set(SAFE_YAML_LOADERS)
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    grew = True
    while grew:
        grew = False
        for cls in classes:
            if cls.name not in safe and any(_dotted(b, aliases) in safe for b in cls.bases):
                safe.add(cls.name)
                grew = True
    return safe


def _keyword(call: ast.Call, name: str, position: int | None = None) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return call.args[position] if position is not None and len(call.args) > position else None


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str) -> list[str]:
    """``line: call`` for every call in ``source`` that may run code from what it loads."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    safe_loaders = _safe_loader_classes(tree, aliases)
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = _dotted(call.func, aliases)
        if name is None:
            continue
        unsafe = name in ALWAYS_UNSAFE
        if name == "numpy.load":
            allow = _keyword(call, "allow_pickle")
            unsafe = allow is not None and not _is_constant(allow, False)
        elif name == "torch.load":
            unsafe = not _is_constant(_keyword(call, "weights_only"), True)
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(call, "Loader", 1)
            unsafe = loader is None or _dotted(loader, aliases) not in safe_loaders
        if unsafe:
            found.append(f"{call.lineno}: {ast.unparse(call)}")
    return found


UNSAFE_SNIPPETS = [
    "import pickle\npickle.loads(data)",
    "import pickle\npickle.load(open(path, 'rb'))",
    "from pickle import loads as undo\nundo(data)",
    "import pickle\npickle.Unpickler(stream).load()",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import numpy\nnumpy.load(path, allow_pickle=flag)",
    "import torch\ntorch.load(path)",
    "import torch\ntorch.load(path, weights_only=False)",
    "from torch import load\nload(path, map_location='cpu')",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.load(text, yaml.UnsafeLoader)",
    "import yaml\nclass L(yaml.Loader): ...\nyaml.load(text, Loader=L)",
    "import yaml\nyaml.unsafe_load(text)",
    "import joblib\njoblib.load(path)",
    "def f(path):\n    import pandas as pd\n    return pd.read_pickle(path)",
]
SAFE_SNIPPETS = [
    "import json\njson.loads(text)",
    "import numpy as np\nnp.load(path)\nnp.load(path, allow_pickle=False)",
    "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nclass _Unique(yaml.SafeLoader): ...\nyaml.load(text, Loader=_Unique)",
    "import pickle\npickle.dumps(obj)",  # writing a pickle runs nothing
]


@pytest.mark.parametrize("snippet", UNSAFE_SNIPPETS)
def test_the_checker_finds_unsafe_loading(snippet: str) -> None:
    assert len(unsafe_loads(snippet)) == 1, snippet


@pytest.mark.parametrize("snippet", SAFE_SNIPPETS)
def test_the_checker_accepts_safe_loading(snippet: str) -> None:
    assert unsafe_loads(snippet) == [], snippet


def test_the_package_never_loads_anything_in_a_way_that_runs_code() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50 and PACKAGE / "errors.py" in files  # the scan reads the package itself
    found = {str(f.relative_to(PACKAGE.parent)): unsafe_loads(f.read_text()) for f in files}
    assert {f: calls for f, calls in found.items() if calls} == {}
    errors_source = (PACKAGE / "errors.py").read_text()
    assert "yaml.load(text, Loader=_UniqueKeyLoader)" in errors_source  # the one yaml.load, accepted as safe
