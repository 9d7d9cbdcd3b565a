"""More contracts of the public API (docs/api.md), beyond tests/tiercache/test_api_contracts.py: close racing
with reads in flight, keys and values of unusual types round-tripping through close and reopen, and a
closed cache used as a context manager."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tiercache import Cache, CacheClosedError


# -- close while reads are in flight ---------------------------------------------------------------------
def _paused_finish(cache, reader_name, entered, limit=1.0):
    """Wrap ``cache._finish`` so the reader thread's first call with released slots pauses until the cache
    is closed (at most ``limit`` seconds: a close that waits for the read never gets there).  Returns a
    list that gets ``True`` when that call went on after the cache had closed."""
    finish = cache._finish
    paused, late = [], []

    def slow(releases, **kw):
        if threading.current_thread().name == reader_name and releases and not paused:
            paused.append(True)
            entered.set()
            deadline = time.monotonic() + limit
            while not cache._closed and time.monotonic() < deadline:
                time.sleep(0.005)
            late.append(cache._closed)
        return finish(releases, **kw)

    cache._finish = slow
    return late


@pytest.mark.parametrize("call", ["get_many", "get"])
def test_close_during_a_promoting_read_loses_no_entry(tmp_path, call):
    """A get that promotes disk entries releases their disk slots; close() must wait until those releases
    are finished.  It used to wait only for the get's bookkeeping, then persisted and closed while the
    reader thread was still discarding: after reopening, most entries of the store were gone (300 entries,
    2 readers, close after 50 ms: 3-216 survived)."""
    n = 24
    values = {i: torch.full((4096,), float(i)) for i in range(n)}  # 16 KiB each: the host tier holds 3
    with Cache(host="64KiB", disk="64MiB", path=tmp_path / "store") as cache:
        for i, v in values.items():
            cache.put(i, v)
    cache = Cache(host="64KiB", disk="64MiB", path=tmp_path / "store")
    entered = threading.Event()
    late = _paused_finish(cache, "reader", entered)
    errors = []

    def read():
        try:
            if call == "get_many":
                cache.get_many(list(values))
            else:
                for key in values:
                    cache.get(key)
        except CacheClosedError:
            pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    assert entered.wait(10), "the read released no disk slot (nothing was promoted)"
    cache.close()
    reader.join(10)
    assert not errors
    assert late == [False], "close() returned while a get was still releasing its slots"
    with Cache(host="64KiB", disk="64MiB", path=tmp_path / "store") as cache:
        assert sorted(cache.keys()) == list(values)
        for i, v in values.items():
            assert torch.equal(cache.get(i), v)


# -- keys and values of unusual types ------------------------------------------------------------------------
KEYS = [1, "1", b"1", (1,), ("1",), ((1,),), 2**64 + 1, -(2**70), 0, "", b"", (), "ünïcødé ☃ 𝄞", "\ud800",
        "k" * 2000, (("a", (1, 2)), b"\x00\xff")]


def test_distinct_keys_stay_distinct_through_reopen(tmp_path):
    """Keys that are equal-looking but of different types (1, "1", b"1", (1,)) are different entries, and each
    comes back after reopen as an equal key of the same type."""
    with Cache(host="1MiB", disk="8MiB", path=tmp_path) as cache:
        for i, key in enumerate(KEYS):
            cache.put(key, torch.tensor([i]))
        assert len(cache) == len(KEYS)
    with Cache(host="1MiB", disk="8MiB", path=tmp_path) as cache:
        assert len(cache) == len(KEYS)
        for i, key in enumerate(KEYS):
            assert cache.get(key).tolist() == [i]
        back = {repr((type(k), k)) for k in cache.keys()}
        assert back == {repr((type(k), k)) for k in KEYS}


def _values():
    torch.manual_seed(0)
    return {
        "bool": torch.rand(77) > 0.5,
        "complex64": torch.randn(5, dtype=torch.complex64),
        "complex128": torch.randn(2, 3, dtype=torch.complex128),
        "conj": torch.randn(4, dtype=torch.complex64).conj(),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bfloat16": torch.randn(300).bfloat16(),
        "float16": torch.randn(33).half(),
        "float8": torch.randn(9).to(torch.float8_e4m3fn),
        "uint16": torch.tensor([1, 65535], dtype=torch.uint16),
        "strided": torch.randn(40, 40)[::3, 1::2],
        "transposed": torch.randn(3, 5).t(),
        "expanded": torch.randn(1, 5).expand(4, 5),
        "offset": torch.arange(10.0)[3:7],
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "zero_size": torch.zeros(3, 0, 2),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical values, dtype and shape (NaN included, -0.0 kept apart from 0.0)."""
    b = b.detach().resolve_conj().resolve_neg()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("disk", [False, True])
def test_unusual_values_round_trip_bit_for_bit(tmp_path, disk):
    """Every dtype and layout comes back with its dtype, shape and bits, from memory, from the disk tier and
    after reopen; a value stored with requires_grad comes back as a plain tensor (a copy, no graph)."""
    values = _values()
    values["requires_grad"] = torch.randn(3, requires_grad=True)
    options = dict(host="1MiB", disk="8MiB", path=tmp_path) if disk else dict(host="1MiB")
    with Cache(**options) as cache:
        for name, value in values.items():
            cache.put(name, value)
        if disk:
            cache.flush()  # everything onto the disk tier
        for name, value in values.items():
            got = cache.get(name)
            assert _same(got, value), name
            assert not got.requires_grad, name
    if disk:
        with Cache(**options) as cache:
            for name, value in values.items():
                assert _same(cache.get(name), value), name


def test_a_closed_cache_refuses_use_as_a_context_manager():
    """``with cache:`` on a closed cache enters (close is idempotent) but every operation inside raises."""
    cache = Cache(host="1MiB")
    with cache:
        cache.put("a", torch.ones(2))
    with pytest.raises(CacheClosedError):
        with cache as again:
            again.get("a")
    assert cache.stats()["closed"] is True


# -- keys the cache cannot hold ------------------------------------------------------------------------------------
def _nested(depth):
    """``depth`` tuples around an empty tuple."""
    key = ()
    for _ in range(depth):
        key = (key,)
    return key


@pytest.mark.parametrize("depth", [33, 100, 5000])
def test_a_key_nested_too_deep_is_a_type_error_everywhere(depth):
    """put refused a key nesting more than 32 tuples inside the outermost with TypeError, but get / get_many / delete / prefetch
    answered KeyError (depth 100) or a RecursionError (depth >= 1000) for the same key: now every call that
    checks keys says TypeError, as for any other key no entry can have.  ``in`` stays a plain False."""
    key = _nested(depth)
    with Cache(host="1MiB") as cache:
        cache.put(_nested(32), torch.ones(1))  # the deepest key put accepts (and always did): 33 tuples
        assert cache.get(_nested(32)).tolist() == [1.0]
        for call in (lambda: cache.put(key, torch.ones(1)), lambda: cache.get(key), lambda: cache.get_many([key]),
                     lambda: cache.delete(key), lambda: cache.prefetch([key])):
            with pytest.raises(TypeError, match="deeper than 32 tuples"):
                call()
        assert key not in cache
        assert len(cache) == 1


@pytest.mark.parametrize("key", [2**16000, -(2**16000), (1, 10**5000)], ids=["big", "negative", "in-tuple"])
def test_an_int_key_too_long_to_store_says_so(key):
    """An int of more digits than a key may encode (2048 bytes) is "too long", like a long str; it used to raise
    Python's "Exceeds the limit (4300 digits) for integer string conversion"."""
    with Cache(host="1MiB") as cache:
        with pytest.raises(ValueError, match="key is too long"):
            cache.put(key, torch.ones(1))
        with pytest.raises(KeyError):
            cache.get(key)  # a key too long to store cannot be present
        assert len(cache) == 0


def test_the_longest_int_key_round_trips(tmp_path):
    key = int("9" * 2043)  # 2043 digits + the 5-byte tag and length: 2048 encoded bytes
    with Cache(host="1MiB", disk="8MiB", path=tmp_path) as cache:
        cache.put(key, torch.ones(1))
        cache.put(-(key // 10), torch.zeros(1))
        with pytest.raises(ValueError, match="key is too long"):
            cache.put(key * 10, torch.ones(1))
    with Cache(host="1MiB", disk="8MiB", path=tmp_path) as cache:
        assert set(cache.keys()) == {key, -(key // 10)}


# -- docs/api.md's option table is the CacheConfig -----------------------------------------------------------------
def test_the_documented_options_are_cacheconfigs_fields_with_their_defaults():
    """Every row of docs/api.md's "Construction" table names a CacheConfig field with the default it shows, and
    every field has a row."""
    import dataclasses
    import pathlib
    import re

    from tiercache import CacheConfig

    text = (pathlib.Path(__file__).parents[2] / "docs" / "api.md").read_text()
    table = text.split("## Construction", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", table, re.M))
    fields = {f.name: f.default for f in dataclasses.fields(CacheConfig)}
    assert set(rows) == set(fields)
    for name, shown in rows.items():
        assert eval(shown) == fields[name], name  # the table shows Python literals


def test_stats_say_which_codec_a_reopened_store_keeps(tmp_path):
    """Reopening with another ``compression`` keeps the store's own codec (docs/api.md); ``config`` shows what was
    asked, so ``stats()["tiers"]["disk"]["compression"]`` says what is in effect."""
    with Cache(host=None, disk="8MiB", path=tmp_path / "plain") as cache:
        cache.put("a", torch.zeros(1000))
        assert cache.stats()["tiers"]["disk"]["compression"] is None
    with Cache(host=None, disk="8MiB", path=tmp_path / "plain", compression="zstd") as cache:
        assert cache.config.compression == "zstd"
        assert cache.stats()["tiers"]["disk"]["compression"] is None
    with Cache(host=None, disk="8MiB", path=tmp_path / "packed", compression="zstd") as cache:
        cache.put("a", torch.zeros(1000))
    with Cache(host=None, disk="8MiB", path=tmp_path / "packed") as cache:
        assert cache.stats()["tiers"]["disk"]["compression"] == "zstd"
        assert torch.equal(cache.get("a"), torch.zeros(1000))
