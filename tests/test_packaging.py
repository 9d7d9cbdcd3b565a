"""The distribution's shape: the kernel package's name, and what transformers sees of it."""

import importlib

import pytest


def test_kernels_ship_as_tiercache_kernels_a_regular_package():
    module = importlib.import_module("tiercache_kernels")
    assert module.__file__ is not None and module.__file__.endswith("__init__.py")
    assert callable(module.gather_blocks_reference)


def test_transformers_does_not_mistake_our_kernels_folder_for_the_kernels_package(monkeypatch):
    """Our ``kernels/`` folder holds only ``tiercache_kernels``: run from the repository root, the name
    ``kernels`` must resolve to the Hugging Face ``kernels`` distribution where it is installed (recent
    transformers releases require it) and to nothing otherwise, never to our folder."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    transformers_utils = pytest.importorskip("transformers.utils")
    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))  # as when running from the repository root, where kernels/ lives
    spec = importlib.util.find_spec("kernels")
    try:
        importlib.metadata.version("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:  # the distribution, not our folder, is what the name resolves to
        assert spec is not None and spec.origin is not None, spec
        origin = Path(spec.origin).resolve()
        assert root / "kernels" not in (origin, *origin.parents), f"'kernels' resolves to our folder: {origin}"
    else:  # our folder may resolve as a namespace package, but transformers must not take it for the package
        assert transformers_utils.is_kernels_available() is False


def test_both_packages_state_the_distributions_version():
    """``tiercache.__version__`` and ``tiercache_llm.__version__`` are pyproject.toml's ``version`` (benchmarks record
    them in their JSON)."""
    import tomllib
    from pathlib import Path

    import tiercache
    import tiercache_llm

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert tiercache.__version__ == tiercache_llm.__version__ == project["version"]
