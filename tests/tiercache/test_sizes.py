import pytest

from tiercache.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (None, 0),
        (4096, 4096),
        ("4096", 4096),
        ("1B", 1),
        ("1k", 1000),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("2 MiB", 2 * 1024**2),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("3GB", 3 * 1000**3),
        (" 1 TiB ", 1024**4),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [-1, "-1KiB", "abc", "12 parsecs", "", "1.2.3MiB", 1.5, True, False, [1], "MiB"])
def test_parse_size_rejects_with_the_name_of_the_field(bad):
    with pytest.raises(ValueError, match="host capacity"):
        parse_size(bad, "host capacity")


@pytest.mark.parametrize(
    ("nbytes", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")]
)
def test_format_size(nbytes, text):
    assert format_size(nbytes) == text


def test_format_then_parse_round_trips_whole_units():
    for nbytes in (1024, 1024**2, 7 * 1024**3):
        assert parse_size(format_size(nbytes).replace(" ", "")) == nbytes
