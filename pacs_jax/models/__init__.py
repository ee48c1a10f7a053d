"""Models: the decoder (Llama / Qwen2 / Qwen3 / SmolLM2), Hugging Face import/export, tokenizers."""

from pacs_jax.models.hf import build_decoder, from_pretrained, read_hf_config, save_pretrained
from pacs_jax.models.llama import Decoder, DecoderConfig, KVCache, ModelLoadError, init_decoder

__all__ = [
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "ModelLoadError",
    "build_decoder",
    "from_pretrained",
    "init_decoder",
    "read_hf_config",
    "save_pretrained",
]
