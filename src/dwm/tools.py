"""Maintainers' tools that live beside the library in the repository (`tools/`), not in the installed package.

`dwm corpus build` rebuilds the corpus shipped in the repository from registry packages (hundreds of lines of
package-client plumbing no library user needs); it is loaded from the checkout this package was installed from
(`pip install -e .`, as `make setup` does). From a wheel it is a one-line error.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from dwm.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def load_tool(name: str) -> ModuleType:
    """tools/NAME.py of the repository checkout, imported as module `dwm_tools_NAME`."""
    mod_name = f"dwm_tools_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = REPO / "tools" / f"{name}.py"
    if not path.is_file():
        raise UserError(f"this needs the maintainers' tool tools/{name}.py of a dwm repository checkout "
                        f"(not part of an installed wheel); looked in {path.parent}")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


# `dwm corpus ...` delegates to tools/corpus.py
def add_arguments(p: argparse.ArgumentParser) -> None:
    try:
        load_tool("corpus").add_arguments(p)
    except UserError as e:  # still parse, so that `run` can print the one-line error
        p.add_argument("rest", nargs="*", help=str(e))


def run(args: argparse.Namespace) -> int:
    return load_tool("corpus").run(args)
