import pytest
import torch


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

