"""The distribution's shape: the kernel package's name, and what transformers sees of it."""

import importlib

import pytest


def test_kernels_ship_as_tiercache_kernels_a_regular_package():
    module = importlib.import_module("tiercache_kernels")
    assert module.__file__ is not None and module.__file__.endswith("__init__.py")
    assert callable(module.gather_blocks_reference)


def test_transformers_does_not_mistake_our_kernels_folder_for_the_kernels_package(monkeypatch):
    transformers_utils = pytest.importorskip("transformers.utils")
    monkeypatch.syspath_prepend(".")  # as when running from the repository root, where kernels/ lives
    assert transformers_utils.is_kernels_available() is False
