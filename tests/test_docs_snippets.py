"""Every ```python block of README.md and docs/*.md runs against the library.

The blocks are found at collection time (a block added later is picked up by itself) and executed after
these rewrites of their syntax tree, and no others:

* absolute path literals (``"/data/tc"``, ``"/nvme/kv"``) become folders under pytest's ``tmp_path``
  (one folder per distinct path, so a block that reopens a path reopens the same store);
* ``max_new_tokens=N`` becomes ``max_new_tokens=4``: the model is a tiny random Llama, the decode length
  proves nothing more at 256;
* on a machine without CUDA the ``gpu=`` keyword is dropped from every call, as the docs' own comment
  ``# gpu="8GiB" with CUDA`` says to: the library refuses a gpu tier without CUDA (``RuntimeError``,
  checked below), so on CPU the block runs with the gpu tier left out;
* on transformers older than 5.24 the ``cache=`` keyword of ``generate`` / a model call becomes
  ``past_key_values=``: 5.24 renamed it, the docs use the new name and say so, and CI also runs 5.17.
  Which name applies is asked of ``tiercache_llm.cache_argument(model)`` (the helper the docs point to;
  it reads the model's ``forward`` signature), and cross-checked against the version number.

Tier sizes are kept as written (budgets are bounds, not allocations: a 200 GiB disk budget writes only what
is put).  A block sees the imports of the blocks before it in the same document, as a reader does, and the
names ``model``, ``input_ids`` and ``mask`` (a tiny random Llama, a batch of two prompts, the first
left-padded, and their attention mask) when it uses them.  Caches a block leaves open are closed after it.
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MAX_NEW_TOKENS = 4
LLM_NAMES = {"model", "input_ids", "mask"}



# Blocks that cannot run here, "file#n" (n counts a file's python blocks from 1) -> the reason.
CANNOT_RUN: dict[str, str] = {}


def _blocks() -> list[tuple[str, int, int, str]]:
    """(doc path relative to the root, 1-based block index in that doc, line of the fence, code)."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for n, match in enumerate(FENCE.finditer(text), start=1):
            line = text.count("\n", 0, match.start()) + 1
            found.append((doc.relative_to(ROOT).as_posix(), n, line, match.group(1)))
    return found


BLOCKS = _blocks()


def _block_id(block) -> str:
    return f"{block[0]}#{block[1]}"


def test_blocks_found():
    """The extraction sees the blocks the docs hold (guards against a fence regex that matches nothing)."""
    docs = {path for path, *_ in BLOCKS}
    assert {"README.md", "docs/api.md", "docs/tiercache_llm.md"} <= docs, docs
    assert len(BLOCKS) >= 6, [_block_id(b) for b in BLOCKS]
    assert set(CANNOT_RUN) <= {_block_id(b) for b in BLOCKS}, "CANNOT_RUN names a block that no longer exists"


def test_gpu_tier_without_cuda_is_refused():
    """Why the ``gpu=`` keyword is dropped on CPU machines: the library refuses the tier there."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the blocks keep gpu=")
    import tiercache

    with pytest.raises(RuntimeError, match="CUDA"):
        tiercache.Cache(gpu="8GiB", host="1MiB")


class _Rewrite(ast.NodeTransformer):
    def __init__(self, tmp_path: Path, cache_keyword: str, drop_gpu: bool):
        self.tmp_path = tmp_path
        self.cache_keyword = cache_keyword
        self.drop_gpu = drop_gpu
        self.paths: dict[str, str] = {}

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str) and re.fullmatch(r"/[\w./-]+", node.value):
            if node.value not in self.paths:
                folder = self.tmp_path / f"p{len(self.paths)}_{node.value.strip('/').replace('/', '_')}"
                self.paths[node.value] = str(folder)
            return ast.copy_location(ast.Constant(self.paths[node.value]), node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        model_call = name in ("generate", "model")  # model.generate(...) or model(...)
        keywords = []
        for kw in node.keywords:
            if self.drop_gpu and kw.arg == "gpu":
                continue
            if kw.arg == "max_new_tokens":
                kw = ast.keyword(arg=kw.arg, value=ast.Constant(MAX_NEW_TOKENS))
            if model_call and kw.arg == "cache":
                kw = ast.keyword(arg=self.cache_keyword, value=kw.value)
            keywords.append(kw)
        node.keywords = keywords
        return node


def _used_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _imports(code: str) -> list[ast.stmt]:
    return [s for s in ast.parse(code).body if isinstance(s, (ast.Import, ast.ImportFrom))]


def _llm_inputs(model):
    torch.manual_seed(1)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 40))
    mask = torch.ones_like(input_ids)
    input_ids[0, :5] = model.config.pad_token_id  # left padding, as batched generation has it
    mask[0, :5] = 0
    return model, input_ids, mask


def _cache_keyword(model) -> str:
    """The keyword this transformers' ``generate`` takes a cache by (see the module docstring)."""
    import transformers
    from packaging.version import Version

    from tiercache_llm import cache_argument

    keyword = cache_argument(model)
    expected = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"
    assert keyword == expected, (transformers.__version__, keyword)
    return keyword


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_doc_block_runs(block, tmp_path, new_tiny_llama):
    path, n, line, code = block
    where = f"{path}:{line} (python block {n})"
    if _block_id(block) in CANNOT_RUN:
        pytest.skip(f"{where}: {CANNOT_RUN[_block_id(block)]}")
    tree = ast.parse(code, filename=where)
    namespace: dict = {"__name__": "__doc_block__"}
    earlier = [b for b in BLOCKS if b[0] == path and b[1] < n]
    for _, _, _, previous in earlier:
        exec(compile(ast.Module(_imports(previous), []), where, "exec"), namespace)

    cache_keyword = "cache"
    if _used_names(tree) & LLM_NAMES:
        model, input_ids, mask = _llm_inputs(new_tiny_llama())
        namespace.update(model=model, input_ids=input_ids, mask=mask)
        cache_keyword = _cache_keyword(model)
    tree = ast.fix_missing_locations(_Rewrite(tmp_path, cache_keyword, not torch.cuda.is_available()).visit(tree))

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(tree, where, "exec"), namespace)
        renamed = [w for w in caught if "past_key_values" in str(w.message)]
        assert not renamed, f"{where}: the block uses a renamed keyword: {renamed[0].message}"
        if "out" in namespace and "input_ids" in namespace and isinstance(namespace["out"], torch.Tensor):
            out, ids = namespace["out"], namespace["input_ids"]
            assert out.shape[0] == ids.shape[0] and out.shape[1] > ids.shape[1], (where, out.shape)
            assert torch.equal(out[:, : ids.shape[1]], ids), where
    finally:
        _close_left_open(namespace)


def _close_left_open(namespace: dict) -> None:
    import tiercache
    from tiercache_llm import TieredKVCache

    for value in namespace.values():  # close() is idempotent; the model is built afresh per block
        if isinstance(value, (TieredKVCache, tiercache.Cache)):
            value.close()
