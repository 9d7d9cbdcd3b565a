"""The names the docs promise exist in the code: ``TieredKVCache`` and ``tiercache.Cache`` options and calls,
``PipelineConfig`` fields, ``stats()`` keys, errors.

Each documented name is one test case, read from the docs at collection time (a name added to a table or to
one of the paragraphs below is checked by itself); a failure names the doc line.  Stats keys are looked up
in real ``stats()`` of a small exact and a small sparse ``TieredKVCache`` (tiny random Llama, host tier
small enough that blocks spill to a disk tier) and of a ``tiercache.Cache`` whose entries were demoted and
promoted, so keys that appear only after such events are present.
"""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LLM_DOC = "docs/tiercache_llm.md"
SPARSE_DOC = "docs/sparse.md"
API_DOC = "docs/api.md"
IDENT = re.compile(r"`([a-z_][a-z0-9_]*\*?)`")  # a backticked bare identifier (`slot_*`: a prefix)



# Documented names that are absent from this tree on purpose -> why.
ABSENT_ON_PURPOSE = {
    "lane_pool": 'docs/sparse.md "Lane pools" records the unmerged lane pool (measured slower; its branch was not kept)',
}


def _lines(doc: str) -> list[str]:
    return (ROOT / doc).read_text(encoding="utf-8").splitlines()


def _paragraph(doc: str, starts: str) -> list[tuple[int, str]]:
    """(line number, text) of the paragraph whose first line starts with ``starts`` (to the next blank line)."""
    lines = _lines(doc)
    for i, line in enumerate(lines):
        if line.startswith(starts):
            out = []
            for j in range(i, len(lines)):
                if not lines[j].strip():
                    break
                out.append((j + 1, lines[j]))
            return out
    raise AssertionError(f"{doc}: no paragraph starting with {starts!r} (moved? update tests/test_docs_names.py)")


def _names(numbered: list[tuple[int, str]], doc: str, exclude=(), stop: str | None = None) -> list[tuple[str, str]]:
    """Backticked bare identifiers of ``numbered`` lines, first occurrence each: (name, "doc:line"); with
    ``stop``, none from where ``stop`` first occurs on."""
    seen: dict[str, str] = {}
    for number, text in numbered:
        stopped = stop is not None and stop in text
        if stopped:
            text = text[: text.index(stop)]
        for name in IDENT.findall(text):
            if name not in exclude:
                seen.setdefault(name, f"{doc}:{number}")
        if stopped:
            break
    return list(seen.items())


def _table_rows(doc: str, header: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every row of every table of ``doc`` whose header line is ``header``."""
    rows, inside = [], False
    for number, line in enumerate(_lines(doc), start=1):
        if line.strip() == header:
            inside = True
            continue
        if inside and line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append((number, [cell.strip() for cell in line.strip().strip("|").split("|")]))
        else:
            inside = False
    return rows


# --- TieredKVCache options ------------------------------------------------------------------------------

def _names_in_table(doc: str, header: str, names: Callable[[str], list[str]]) -> list[tuple[str, str]]:
    """(name, "doc:line") of each name ``names(first cell)`` finds in the tables of ``doc`` headed ``header``,
    first mention only."""
    found: dict[str, str] = {}
    for number, cells in _table_rows(doc, header):
        for name in names(cells[0]):
            found.setdefault(name, f"{doc}:{number}")
    return list(found.items())


OPTIONS = _names_in_table(LLM_DOC, "| option | default | meaning |", IDENT.findall)


def test_option_tables_found():
    names = {name for name, _ in OPTIONS}
    assert {"mode", "host", "budget", "pipeline", "pool_bytes"} <= names, names


@pytest.mark.parametrize("name,where", OPTIONS, ids=[n for n, _ in OPTIONS])
def test_documented_option_exists(name, where):
    from tiercache_llm import TieredKVCache, TieredKVSettings

    params = inspect.signature(TieredKVCache.__init__).parameters
    assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY, (
        f"{where} documents TieredKVCache option {name!r}, which is not a keyword-only parameter")
    if name not in ("cache", "settings"):  # the docs: every option also exists in TieredKVSettings
        fields = {f.name for f in dataclasses.fields(TieredKVSettings)}
        assert name in fields, f"{where} documents option {name!r}, which TieredKVSettings lacks"


def test_for_model_takes_the_constructor_options(new_tiny_llama):
    """``for_model(model, **options)`` forwards its options to the constructor: a documented option is taken,
    an unknown one is refused by the constructor's signature."""
    from tiercache_llm import TieredKVCache

    model = new_tiny_llama()
    TieredKVCache.for_model(model, host="1MiB", block_size=16).close()
    with pytest.raises(TypeError, match="no_such_option"):
        TieredKVCache.for_model(model, no_such_option=1)


# --- tiercache.Cache options and operations (docs/api.md) ------------------------------------------------

def _api_names(header: str, pattern: str, doc: str = API_DOC) -> list[tuple[str, str]]:
    def names(cell: str) -> list[str]:
        matches = (re.match(pattern, span) for span in re.findall(r"`([^`]*)`", cell))
        # `len(cache)`, `iter(cache)`: builtins
        return [m.group(1) for m in matches if m and m.group(1) not in ("len", "iter")]
    return _names_in_table(doc, header, names)


CACHE_OPTIONS = _api_names("| option | default | meaning |", r"^([a-z_]\w*)$")
CACHE_CALLS = _api_names("| call | contract |", r"^([a-z_]\w*)(?:\(|$)")


def test_api_tables_found():
    assert {"host", "disk", "disk_sector_bytes"} <= {n for n, _ in CACHE_OPTIONS}, CACHE_OPTIONS
    assert {"put", "get_many", "close", "config"} <= {n for n, _ in CACHE_CALLS}, CACHE_CALLS
    assert {"crop", "reorder_cache", "reset"} <= {n for n, _ in KV_CALLS}, KV_CALLS


@pytest.mark.parametrize("name,where", CACHE_OPTIONS, ids=[n for n, _ in CACHE_OPTIONS])
def test_documented_cache_option_exists(name, where):
    import tiercache

    fields = {f.name for f in dataclasses.fields(tiercache.CacheConfig)}
    assert name in fields, f"{where} documents tiercache.Cache option {name!r}, which CacheConfig lacks"


@pytest.mark.parametrize("name,where", CACHE_CALLS, ids=[n for n, _ in CACHE_CALLS])
def test_documented_cache_operation_exists(name, where):
    import tiercache

    with tiercache.Cache(host="1MiB") as cache:  # an instance: `config`, `tiers` are set by __init__
        assert hasattr(cache, name), f"{where} documents tiercache.Cache.{name}, which a Cache lacks"


KV_CALLS = _api_names("| call | behaviour |", r"^([a-z_]\w*)(?:\(|$)", LLM_DOC)  # `copy.deepcopy(cache)`: no match


@pytest.mark.parametrize("name,where", KV_CALLS, ids=[n for n, _ in KV_CALLS])
def test_documented_kv_cache_call_exists(name, where):
    from tiercache_llm import TieredKVCache

    assert hasattr(TieredKVCache, name), f"{where} documents TieredKVCache.{name}, which the class lacks"


# --- PipelineConfig fields ------------------------------------------------------------------------------

def _documented_pipeline_names() -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for doc in (LLM_DOC, SPARSE_DOC):
        for number, line in enumerate(_lines(doc), start=1):
            for name in re.findall(r"PipelineConfig\.([A-Za-z_]\w*)", line):
                found.setdefault(name, f"{doc}:{number}")
            for span in re.findall(r"`pipeline=(\{[^`]*\})`", line):  # pipeline={"field": ...} overrides
                for name in re.findall(r"[\"'](\w+)[\"']\s*:", span):
                    found.setdefault(name, f"{doc}:{number}")
    # the `pipeline` option's row: the fields it names (and its example dict's keys)
    for number, cells in _table_rows(LLM_DOC, "| option | default | meaning |"):
        if cells[0] == "`pipeline`":
            for name in IDENT.findall(cells[2]) + re.findall(r"\"(\w+)\":", cells[2]):
                if name != "bool":
                    found.setdefault(name, f"{LLM_DOC}:{number}")
    return list(found.items())


PIPELINE_NAMES = _documented_pipeline_names()


def test_pipeline_names_found():
    names = {name for name, _ in PIPELINE_NAMES}
    assert {"pool_bytes", "staging_bytes", "predictor", "stage_near", "disk_staging"} <= names, names


@pytest.mark.parametrize("name,where", PIPELINE_NAMES, ids=[n for n, _ in PIPELINE_NAMES])
def test_documented_pipeline_field_exists(name, where):
    from tiercache_llm.sparse.pipeline import PipelineConfig

    if name in ABSENT_ON_PURPOSE:
        pytest.skip(ABSENT_ON_PURPOSE[name])
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    assert name in fields or hasattr(PipelineConfig, name), (
        f"{where} names PipelineConfig {name!r}, which is neither a field nor an attribute")


def test_attention_aware_only_list_matches_the_code():
    from tiercache_llm.kv_cache import ATTENTION_AWARE_ONLY

    row = [(n, c) for n, c in _table_rows(LLM_DOC, "| option | default | meaning |") if c[0] == "`pipeline`"]
    assert len(row) == 1, row
    number, cells = row[0]
    listed = re.search(r"ATTENTION_AWARE_ONLY`: ([^)]*)\)", cells[2])
    assert listed, f"{LLM_DOC}:{number}: the ATTENTION_AWARE_ONLY list is not found"
    assert set(IDENT.findall(listed.group(1))) == set(ATTENTION_AWARE_ONLY), f"{LLM_DOC}:{number}"


# --- stats() keys ---------------------------------------------------------------------------------------

KV_TOP = ("kv", "prefetch", "pipeline", "sparse", "tiercache")


def _documented_stats_paths() -> list[tuple[tuple[str, ...], str]]:
    """(key path, "doc:line") of every stats key the docs name.  A path that starts with one of ``KV_TOP`` is
    a ``TieredKVCache.stats()`` path, any other a ``tiercache.Cache.stats()`` one.  A path may end in
    ``("|", alternative parents...)`` form: see :func:`_resolve_any`."""
    found: list[tuple[tuple[str, ...], str]] = []
    # explicit stats()["a"]["b"] anywhere in the docs
    for doc in ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(_lines(doc), start=1):
            for match in re.finditer(r"stats\(\)((?:\[[\"'][\w>-]+[\"']\])+)", line):
                found.append((tuple(re.findall(r"\[[\"']([\w>-]+)[\"']\]", match.group(1))), f"{doc}:{number}"))
    # the stats()["kv"] table
    for number, cells in _table_rows(LLM_DOC, "| field | meaning |"):
        for name in IDENT.findall(cells[0]):
            found.append((("kv", name), f"{LLM_DOC}:{number}"))
    # the stats()["prefetch"] paragraph
    for name, where in _names(_paragraph(LLM_DOC, '`stats()["prefetch"]` —'), LLM_DOC):
        found.append((("prefetch", name), where))
    # the stats()["sparse"] paragraph: settings' items, or those of total / last_step
    for name, where in _names(_paragraph(LLM_DOC, '**Statistics.** `stats()["sparse"]`'), LLM_DOC):
        found.append((("sparse", "|", "", "settings", "total", name), where))
    # the stats()["pipeline"] paragraph: its items, or those of its `staging` dict (up to the sentence on
    # stats()["sparse"] that closes it)
    pipeline = _paragraph(SPARSE_DOC, '**`stats()["pipeline"]`**')
    for name, where in _names(pipeline, SPARSE_DOC, stop='stats()["sparse"]', exclude=("",)):
        found.append((("pipeline", "|", "", "staging", name), where))
    # the stats()["tiercache"] paragraph: per tier items, then overall ones
    paragraph = _paragraph(LLM_DOC, '`stats()["tiercache"]` —')
    overall = False
    for number, text in paragraph:
        before, sep, after = text.partition("and overall")
        for name in IDENT.findall(before):
            if name not in ("host", "disk", "gpu"):
                found.append((("tiercache", "tiers", "disk", name) if not overall else ("tiercache", name),
                              f"{LLM_DOC}:{number}"))
        if sep:
            overall = True
            for name in IDENT.findall(after):
                found.append((("tiercache", name), f"{LLM_DOC}:{number}"))
    # docs/api.md: the stats() JSON example, and the describe() items of memory and disk tiers
    text = (ROOT / API_DOC).read_text(encoding="utf-8")
    block = re.search(r"## `stats\(\)`\n\n```json\n(.*?)```", text, re.S)
    assert block, f"{API_DOC}: the stats() JSON example is not found"
    line = text.count("\n", 0, block.start(1)) + 1

    def walk(obj, prefix):
        for key, value in obj.items():
            found.append((prefix + (key,), f"{API_DOC}:{line}"))
            if isinstance(value, dict):
                walk(value, prefix + (key,))

    walk(json.loads(block.group(1)), ())
    describe = _paragraph(API_DOC, "- A tier with a `describe()`")
    import tiercache

    methods = {n for n in dir(tiercache.Cache) if not n.startswith("_")}  # `get_many` in a gloss is no key
    tier = None
    for number, text in describe:
        for piece in re.split(r"(memory tiers:|the disk tier:|A closed cache)", text):
            if piece == "memory tiers:":
                tier = "host"
            elif piece == "the disk tier:":
                tier = "disk"
            elif piece == "A closed cache":
                tier = None
            elif tier is not None:
                for name in IDENT.findall(piece):
                    if name != "null" and name not in methods:
                        found.append((("tiers", tier, name), f"{API_DOC}:{number}"))
    return found


STATS_PATHS = _documented_stats_paths()


def _stats_id(path: tuple[str, ...]) -> str:
    if "|" not in path:
        return "/".join(path)
    bar = path.index("|")
    alts = "|".join(a or "." for a in path[bar + 1:-1])
    return "/".join(path[:bar] + (f"({alts})", path[-1]))


@pytest.fixture(scope="module")
def real_stats(tmp_path_factory, new_tiny_llama):
    """{"kv": [exact stats, sparse stats], "tiercache": [stats]} after real work."""
    import tiercache
    from tiercache_llm import TieredKVCache, cache_kwargs

    out = {"kv": [], "tiercache": []}
    model = new_tiny_llama()
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 96))
    for mode in ("exact", "sparse"):
        path = tmp_path_factory.mktemp(f"kv_{mode}")
        extra = {"pool_bytes": "1MiB"} if mode == "sparse" else {}  # "auto" (the 32 KiB host) is below a union
        cache = TieredKVCache.for_model(model, mode=mode, block_size=16, host="32KiB", disk="64MiB", path=str(path),
                                        **extra)
        try:
            model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache, model),
                           max_new_tokens=4, do_sample=False)
            out["kv"].append(cache.stats())
        finally:
            if mode == "sparse":
                cache.restore_model()
            cache.close()
    with tiercache.Cache(host="64KiB", disk="16MiB", path=str(tmp_path_factory.mktemp("tc"))) as cache:
        for i in range(8):  # 128 KiB into a 64 KiB host tier: demotions host->disk
            cache.put(i, torch.randn(4096))
        for i in range(8):  # gets of demoted entries promote them: disk->host
            cache.get(i)
        out["tiercache"].append(cache.stats())
    return out


def _resolve(stats, path) -> bool:
    node = stats
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _resolve_any(stats, path) -> bool:
    """``path`` plain, or ``(head..., "|", alt1, alt2, ..., name)``: ``head + alt + name`` resolves for some
    ``alt`` ("" = none); a name ending in ``*`` is a prefix."""
    if "|" not in path:
        return _resolve(stats, path)
    bar = path.index("|")
    head, alts, name = path[:bar], path[bar + 1:-1], path[-1]
    for alt in alts:
        parent = head + ((alt,) if alt else ())
        if name.endswith("*"):
            node = stats
            if _resolve(stats, parent):
                for key in parent:
                    node = node[key]
                if isinstance(node, dict) and any(str(k).startswith(name[:-1]) for k in node):
                    return True
        elif _resolve(stats, parent + (name,)):
            return True
    return False


def test_stats_names_found():
    ends = {(p[0], p[-1]) for p, _ in STATS_PATHS}
    for needle in (("kv", "tokens"), ("prefetch", "hit_rate"), ("sparse", "reuse_rate"), ("pipeline", "pool_slots"),
                   ("tiercache", "evictions"), ("tiers", "capacity_bytes"), ("tiers", "confirmed_sound")):
        assert needle in ends, needle


@pytest.mark.parametrize("path,where", STATS_PATHS, ids=[f"{_stats_id(p)}@{w}" for p, w in STATS_PATHS])
def test_documented_stats_key_exists(path, where, real_stats):
    kind = "kv" if path[0] in KV_TOP else "tiercache"
    assert any(_resolve_any(stats, path) for stats in real_stats[kind]), (
        f"{where} documents stats key {_stats_id(path)!r}, absent from a real "
        f"{'TieredKVCache' if kind == 'kv' else 'tiercache.Cache'}.stats()")


# --- errors ---------------------------------------------------------------------------------------------

def _documented_errors() -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for doc in ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(_lines(doc), start=1):
            for name in re.findall(r"`((?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Warning))`", line):
                found.setdefault(name, f"{doc}:{number}")
    return list(found.items())


ERRORS = _documented_errors()


@pytest.mark.parametrize("name,where", ERRORS, ids=[n for n, _ in ERRORS])
def test_documented_error_exists(name, where):
    """A builtin, or an exception class of tiercache / tiercache_llm (top level or one of their modules)."""
    import importlib

    import tiercache
    import tiercache_llm
    import tiercache_llm.kv_cache  # noqa: F401  (loads the modules that define the errors)

    *module, attr = name.split(".")
    if module:
        obj = getattr(importlib.import_module(".".join(module)), attr, None)
    else:
        obj = getattr(builtins, attr, None) or getattr(tiercache, attr, None) or getattr(tiercache_llm, attr, None)
        if obj is None:
            loaded = [m for n, m in list(sys.modules.items()) if n.split(".")[0] in ("tiercache", "tiercache_llm")]
            obj = next((getattr(m, attr) for m in loaded if isinstance(getattr(m, attr, None), type)), None)
    assert isinstance(obj, type) and issubclass(obj, BaseException), (
        f"{where} names {name!r}, which is no exception class of the library or of Python")
