"""Named, removable monkeypatches of megatron-core, shared by ``cuda_compat`` (CPU) and
``megatron_patches`` (the torch-Adam fallback's checkpoint bugs).

Each patch can be taken out again (``revert`` / ``unpatched``) so a test can show the call it
guards still fails without it: an upgrade that fixes one is noticed, and the patch dropped.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable, Iterator

# (object, attribute, replacement) per patch name.
Targets = dict[str, list[tuple[Any, str, Any]]]


class PatchSet:
    def __init__(self, module: str, names: tuple[str, ...], targets: Callable[[], Targets],
                 needed: Callable[[], bool], tested_versions: tuple[str, ...], test_file: str):
        self.module, self.names, self.targets, self.needed = module, names, targets, needed
        self.tested_versions, self.test_file = tested_versions, test_file
        self._original: dict[str, list[Any]] = {}

    def is_active(self) -> bool:
        return bool(self._original)

    def apply(self) -> bool:
        """Install every patch not yet in place, when ``needed()``. Idempotent; returns whether
        the patches are active."""
        if not self.needed():
            return False
        from megatron.core import package_info

        if not self._original and package_info.__version__ not in self.tested_versions:
            warnings.warn(
                f"megatron_mosaic.training.{self.module} was tested with megatron-core "
                f"{self.tested_versions}, found {package_info.__version__}: run {self.test_file} "
                f"to check which patches are still needed", stacklevel=3)
        for name, targets in self.targets().items():
            if name not in self._original:
                # getattr_static keeps a staticmethod a staticmethod when it is put back.
                self._original[name] = [inspect.getattr_static(obj, attr) for obj, attr, _ in targets]
                for obj, attr, replacement in targets:
                    setattr(obj, attr, replacement)
        return True

    def revert(self, *names: str) -> None:
        """Undo ``apply`` for the named patches (all by default)."""
        targets = self.targets()
        for name in names or self.names:
            if name not in self.names:
                raise ValueError(f"unknown {self.module} patch {name!r}; patches are {self.names}")
            if name in self._original:
                for (obj, attr, _), original in zip(targets[name], self._original.pop(name)):
                    setattr(obj, attr, original)

    @contextlib.contextmanager
    def unpatched(self, *names: str) -> Iterator[None]:
        """Temporarily remove the named patches (all by default); re-applied on exit if they were."""
        was_active = self.is_active()
        self.revert(*names)
        try:
            yield
        finally:
            if was_active:
                self.apply()
