import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.keys import MAX_KEY_BYTES, decode_key, encode_key, validate_key

scalar_keys = st.one_of(
    st.text(max_size=20), st.binary(max_size=20), st.integers(min_value=-(10**30), max_value=10**30)
)
keys = st.recursive(scalar_keys, lambda children: st.tuples(children) | st.lists(children, max_size=4).map(tuple),
                    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(keys)
def test_round_trip(key):
    data = encode_key(key)
    assert isinstance(data, bytes)
    back = decode_key(data)
    assert back == key
    assert type(back) is type(key)
    assert encode_key(back) == data


@settings(max_examples=200, deadline=None)
@given(keys, keys)
def test_encoding_is_canonical_and_injective(a, b):
    assert (encode_key(a) == encode_key(b)) == (a == b and type(a) is type(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [(1, "1"), ("a", b"a"), (("a",), "a"), ((1, 2), ((1,), 2)), ((), ""), ((), b""), (0, -0 + 1), ("ab", ("a", "b"))],
)
def test_distinct_keys_encode_differently(a, b):
    assert encode_key(a) != encode_key(b)


def test_encoding_is_stable_across_processes():
    """Never Python's salted hash(): another interpreter (other hash seed) encodes identically."""
    key = ("layer", 3, b"\x00\xff", ("nested", -7, "ünïcode"))
    code = "import sys; from tiercache.keys import encode_key; sys.stdout.write(encode_key(%r).hex())" % (key,)
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        assert bytes.fromhex(out) == encode_key(key)


def test_known_encoding():
    # The format is persisted in disk headers: changing it breaks reopening old stores.
    assert encode_key(("a", 1, b"\x01")) == (
        b"t\x03\x00\x00\x00" b"s\x01\x00\x00\x00a" b"i\x01\x00\x00\x001" b"b\x01\x00\x00\x00\x01"
    )


@pytest.mark.parametrize(
    "bad", [True, False, 1.0, float("nan"), None, [1], ["a"], {"a": 1}, {1}, ("ok", [1]), ("ok", 2.5), (True,),
            bytearray(b"x"), object()]
)
def test_rejected_types(bad):
    with pytest.raises(TypeError):
        encode_key(bad)
    with pytest.raises(TypeError):
        validate_key(bad)


def test_too_long_keys_are_rejected():
    limit_ok = "x" * (MAX_KEY_BYTES - 5)  # 1 tag byte + 4 length bytes
    assert len(encode_key(limit_ok)) == MAX_KEY_BYTES
    with pytest.raises(ValueError, match="too long"):
        encode_key("x" * (MAX_KEY_BYTES - 4))
    with pytest.raises(ValueError, match="too long"):
        encode_key(tuple(range(1000)))


def test_too_deep_nesting_is_rejected():
    key: object = "leaf"
    for _ in range(40):
        key = (key,)
    with pytest.raises(TypeError, match="deeper"):
        encode_key(key)


def test_validate_returns_the_key_unchanged():
    key = ("a", (1, b"b"))
    assert validate_key(key) is key


@pytest.mark.parametrize("bad", [b"", b"x", b"s\x05\x00\x00\x00ab", b"i\x01\x00\x00\x00z", b"s\x00\x00\x00\x00extra",
                                 b"t\x02\x00\x00\x00s\x00\x00\x00\x00"])
def test_malformed_encodings_raise_value_error(bad):
    with pytest.raises(ValueError):
        decode_key(bad)


def test_check_key_rejects_what_encode_key_rejects_without_encoding():
    from tiercache.keys import check_key

    for good in ("a", b"b", 3, ("a", (1, b"x")), ()):
        check_key(good)
    for bad in (True, 1.5, ["a"], ("a", 2.0), (("x", None),)):
        with pytest.raises(TypeError):
            check_key(bad)


# -- C6: exact types only, and every accepted key comes back as itself ------------------------------------
import enum  # noqa: E402
from collections import namedtuple  # noqa: E402

from tiercache.keys import check_key  # noqa: E402

any_text = st.text(st.characters(exclude_categories=()), max_size=20)  # lone surrogates included
exact_scalars = st.one_of(any_text, st.binary(max_size=20), st.integers(min_value=-(10**600), max_value=10**600))
exact_keys = st.recursive(exact_scalars, lambda children: st.lists(children, max_size=4).map(tuple), max_leaves=10)


def _same_types(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if type(a) is tuple:
        return len(a) == len(b) and all(_same_types(x, y) for x, y in zip(a, b))
    return a == b


@settings(max_examples=300, deadline=None)
@given(exact_keys)
def test_every_accepted_key_round_trips_with_the_same_type_at_every_level(key):
    try:
        data = encode_key(key)
    except ValueError:  # too long: refused, which is allowed
        return
    assert _same_types(decode_key(data), key)


class Color(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class Blob(bytes):
    pass


Point = namedtuple("Point", "x y")


@pytest.mark.parametrize("bad, hint", [
    (Color.RED, "int(key)"), (Name("a"), "str(key)"), (Blob(b"a"), "bytes(key)"), (Point(1, 2), "tuple(key)"),
    (("ok", Color.RED), "int(key)"),
])
def test_key_subclasses_are_refused_with_a_conversion_hint(bad, hint):
    for check in (encode_key, check_key):
        with pytest.raises(TypeError, match="subclass") as info:
            check(bad)
        assert hint in str(info.value) and type(bad).__name__ in str(info.value)


def test_max_dims_is_exported():
    from tiercache.keys import MAX_DIMS

    assert MAX_DIMS == 64
