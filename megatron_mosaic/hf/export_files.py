"""The files of an exported model directory: staging it, and the portable model code shipped in it.

``staged_directory`` builds the output next to its final place and renames it in only when
complete (shared by the export and the HF -> Megatron importer). ``copy_model_code`` ships the
model code files (MODEL_CODE_FILES) plus the memory-math files they import relatively, copied
flat, after checking that each imports nothing beyond torch, transformers and the standard
library. This module itself is not shipped.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import sys
import tempfile
from typing import Iterator

from .conversion import ConversionError

HF_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MEMORY_PACKAGE_DIR = os.path.join(os.path.dirname(HF_PACKAGE_DIR), "memory")
MODEL_CODE_FILES = (
    "configuration_memory_mosaic.py",
    "modeling_memory_mosaic.py",
    "layers_memory_mosaic.py",
    "memories_memory_mosaic.py",
    "cache_memory_mosaic.py",
)
MODELING_FILE = "modeling_memory_mosaic.py"
# What a machine with only torch and transformers installed can import.
_ALLOWED_ABSOLUTE_IMPORTS = {"torch", "transformers", "sentencepiece"} | set(sys.stdlib_module_names)


@contextlib.contextmanager
def staged_directory(output_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory next to ``output_dir``; rename it to ``output_dir`` on success.

    Refuses a non-empty ``output_dir`` unless ``overwrite``. On any exception the temporary
    directory is removed and ``output_dir`` is left as it was.
    """
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise FileExistsError(f"--output {output_dir}: exists and is not a directory")
        if os.listdir(output_dir) and not overwrite:
            raise FileExistsError(f"--output {output_dir}: exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not os.path.exists(output_dir):
        os.replace(staging, output_dir)
        return
    # Replacing: move the old directory aside first, so no moment exists without a whole one.
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
    os.replace(output_dir, os.path.join(old, "previous"))
    os.replace(staging, output_dir)
    shutil.rmtree(old, ignore_errors=True)


def _parse(path: str) -> ast.Module:
    return ast.parse(open(path, encoding="utf-8").read(), filename=path)


def _relative_imports(path: str) -> list[str]:
    """Sibling modules ``path`` imports (``from .name import ...``); deeper forms cannot be
    resolved in a flat exported directory."""
    modules = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.level > 1 or not node.module:
                raise ConversionError(f"{path}: 'from {'.' * node.level}{node.module or ''} import ...' cannot be "
                                      "resolved in a flat exported model directory")
            modules.append(node.module)
    return modules


def memory_code_files() -> list[str]:
    """The memory-math files an exported directory needs: those the model code files import
    relatively, then theirs, transitively. Early transformers 5.x (5.0) copies only the modeling
    file's direct relative imports into its module cache, so every file reached (model code or
    memory math) must be one of them."""
    modeling = os.path.join(HF_PACKAGE_DIR, MODELING_FILE)
    direct = {f"{module}.py" for module in _relative_imports(modeling)}
    needed = _relative_import_closure(modeling)
    indirect = sorted(needed - direct - {MODELING_FILE})
    if indirect:
        raise ConversionError(f"{modeling}: needs {', '.join(indirect)} only through other files; import each "
                              "directly (transformers 5.0 loads no indirect relative import of remote code)")
    return sorted(needed - set(MODEL_CODE_FILES))


def _relative_import_closure(modeling: str) -> set[str]:
    """Model code and memory files ``modeling`` imports relatively, and theirs, transitively."""
    needed: set[str] = set()
    queue = [(module, modeling) for module in _relative_imports(modeling)]
    while queue:
        module, importer = queue.pop()
        name = f"{module}.py"
        if name in needed:
            continue
        folder = HF_PACKAGE_DIR if name in MODEL_CODE_FILES else MEMORY_PACKAGE_DIR
        source = os.path.join(folder, name)
        if not os.path.isfile(source):
            raise ConversionError(f"{importer}: imports .{module}, which is neither a model code file nor in "
                                  f"{MEMORY_PACKAGE_DIR}")
        needed.add(name)
        queue += [(sibling, source) for sibling in _relative_imports(source)]
    return needed


def _check_portable(path: str) -> None:
    """A memory file shipped as remote code may import only the allowed packages (and, relatively,
    its siblings, which memory_code_files ships as well)."""
    for node in ast.walk(_parse(path)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for name in names:
            if name.split(".")[0] not in _ALLOWED_ABSOLUTE_IMPORTS:
                raise ConversionError(f"{path}: imports {name!r}, which an exported model directory cannot provide")


def copy_model_code(target_dir: str) -> None:
    """Model code files (MODEL_CODE_FILES) and memory-math files into ``target_dir`` (flat)."""
    sources = [os.path.join(HF_PACKAGE_DIR, f) for f in MODEL_CODE_FILES]
    sources += [os.path.join(MEMORY_PACKAGE_DIR, f) for f in memory_code_files()]
    for source in sources:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source}: missing from the megatron_mosaic package")
        if os.path.dirname(source) == MEMORY_PACKAGE_DIR:
            _check_portable(source)
        shutil.copyfile(source, os.path.join(target_dir, os.path.basename(source)))
