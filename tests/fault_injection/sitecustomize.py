"""Test-only fault injection, loaded by Python at start-up when this folder is on PYTHONPATH.

Once `replicas.model_runner` is imported, every step whose batch holds a sequence containing the
token id in $CONTINUUM_FAULT_TOKEN raises, as a failing kernel or device would.
"""

import importlib.abc
import importlib.util
import os
import sys

POISON = int(os.environ.get("CONTINUUM_FAULT_TOKEN", "-1"))


def _patch(module) -> None:
    execute = module.ModelRunner.execute

    def failing_execute(self, batch, *args):
        if any(POISON in seq.token_ids for seq in batch.seqs):
            raise RuntimeError("injected fault")
        return execute(self, batch, *args)

    module.ModelRunner.execute = failing_execute


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "replicas.model_runner":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if POISON >= 0:
    sys.meta_path.insert(0, _PatchOnImport())
