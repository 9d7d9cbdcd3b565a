from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: a folder named gpu is a keyword too
            item.add_marker(skip)


@pytest.fixture
def run_cli(capsys):
    """``run_cli(main, *argv) -> (exit code, stdout, stderr)`` for a CLI ``main(argv)`` (argparse exits included)."""

    def run(main, *argv):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def assert_one_line_error():
    """``check(stderr, *needles)``: the CLI printed exactly one error line, with every needle and no traceback."""

    def check(err, *needles):
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert "Traceback" not in err and "error:" in lines[0]
        for needle in needles:
            assert needle in lines[0], lines[0]

    return check



@pytest.fixture(scope="session")
def new_tiny_llama():
    """``new_tiny_llama()`` -> a fresh tests/tiercache_llm/conftest.py ``tiny_model("llama")`` (a new model per call:
    ``for_model`` prepares the model it is given).  For tests outside tests/tiercache_llm, which its fixtures do
    not reach; that conftest is loaded by path (pytest runs with ``--import-mode=importlib``: no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_llm_conftest", TESTS / "tiercache_llm" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda: module.tiny_model("llama")
