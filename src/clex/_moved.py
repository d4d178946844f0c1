"""Old module paths that keep importing after the package was laid out by purpose.

``import clex.train`` gives the module now at ``clex.training.loop`` (the same object, so patching one
patches the other). New code should import the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "clex.train": "clex.training.loop",
    "clex.chat": "clex.serve.chat",
    "clex.export": "clex.serve.export",
    "clex.export_gguf": "clex.serve.gguf",
    "clex.fetch": "clex.data.fetch",
    "clex.corpora": "clex.data.corpora",
    "clex.demo": "clex.cli.demo",
    "clex.report": "clex.eval.report",
    "clex.checkpoint": "clex.io.checkpoint",
    "clex.outdir": "clex.io.outdir",
    "clex.runs": "clex.io.train_run",
    "clex.eval.output": "clex.io.eval_run",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
