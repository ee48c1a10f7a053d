"""Hugging Face folders <-> our decoder: read config.json + safetensors, write them back.

HF stores projections as [out, in] matrices; we store them split by head ([embed, heads, head_dim])
and stacked over layers, so import transposes, reshapes and stacks, and export undoes it. Every
tensor is checked against the shape config.json implies, so a folder that does not match its own
config stops here with the file and tensor named, never later with a shape error inside jit.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from pacs_jax.models.llama import Decoder, DecoderConfig, ModelLoadError, layer_param_shapes, resolve_dtype

# Our per-layer name -> HF name (without the "model.layers.{i}." prefix).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _to_ours(name: str, hf_tensor: np.ndarray, config: DecoderConfig) -> np.ndarray:
    """One layer's HF tensor -> our layout."""
    h, kv, hd, d = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
    if name == "q_proj":
        return hf_tensor.T.reshape(d, h, hd)
    if name in ("k_proj", "v_proj"):
        return hf_tensor.T.reshape(d, kv, hd)
    if name == "o_proj":
        return hf_tensor.T.reshape(h, hd, d)
    if name == "q_bias":
        return hf_tensor.reshape(h, hd)
    if name in ("k_bias", "v_bias"):
        return hf_tensor.reshape(kv, hd)
    if name in ("gate_proj", "up_proj", "down_proj"):
        return hf_tensor.T
    return hf_tensor


def _to_hf(name: str, ours: np.ndarray) -> np.ndarray:
    if name in ("q_proj", "k_proj", "v_proj"):
        d = ours.shape[0]
        return np.ascontiguousarray(ours.reshape(d, -1).T)
    if name == "o_proj":
        return np.ascontiguousarray(ours.reshape(-1, ours.shape[-1]).T)
    if name in ("q_bias", "k_bias", "v_bias"):
        return ours.reshape(-1)
    if name in ("gate_proj", "up_proj", "down_proj"):
        return np.ascontiguousarray(ours.T)
    return ours


def _expected_hf_shape(name: str, config: DecoderConfig) -> tuple[int, ...]:
    shape, _ = layer_param_shapes(config)[name]
    return _to_hf(name, np.empty(shape, np.float32)).shape


def read_hf_config(path: str | Path) -> dict:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist (model.path)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
    return json.loads(config_file.read_text())


def _safetensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file, for single-file and index-sharded checkpoints."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ModelLoadError(f"{index} names shard {missing[0]} which is not in {folder}")
        return {name: folder / f for name, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights (PyTorch .bin checkpoints are not read: "
            f"re-save the model with safe_serialization=True)"
        )
    names = {}
    for file in files:
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                names[name] = file
    return names


def load_hf_params(folder: str | Path, config: DecoderConfig) -> dict:
    """Read every tensor, check its shape, and return our pure parameter dict (param dtype)."""
    folder = Path(folder).expanduser()
    dtype = resolve_dtype(config.param_dtype, "model.param_dtype")
    locations = _safetensor_files(folder)
    handles = {}

    def read(name: str, expected: tuple[int, ...]) -> np.ndarray:
        if name not in locations:
            raise ModelLoadError(f"{folder}: tensor {name!r} is missing from the safetensors files (config.json implies it)")
        file = locations[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="flax")
        tensor = handles[file].get_tensor(name)
        if tuple(tensor.shape) != tuple(expected):
            raise ModelLoadError(
                f"{file}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies {tuple(expected)}"
            )
        return tensor

    used = set()
    v, d = config.vocab_size, config.hidden_size
    params = {"embed": read("model.embed_tokens.weight", (v, d)).astype(dtype)}
    used.add("model.embed_tokens.weight")
    params["final_norm"] = read("model.norm.weight", (d,)).astype(dtype)
    used.add("model.norm.weight")
    if not config.tie_word_embeddings:
        params["lm_head"] = read("lm_head.weight", (v, d)).astype(dtype).T
        used.add("lm_head.weight")
    elif "lm_head.weight" in locations:
        used.add("lm_head.weight")  # some tied exports still write the shared matrix
    layers = {}
    for name in layer_param_shapes(config):
        per_layer = []
        for i in range(config.num_layers):
            hf_name = f"model.layers.{i}.{_LAYER_NAMES[name]}"
            per_layer.append(_to_ours(name, np.asarray(read(hf_name, _expected_hf_shape(name, config))), config))
            used.add(hf_name)
        layers[name] = jnp.asarray(np.stack(per_layer), dtype)
    params["layers"] = layers
    unexpected = sorted(n for n in set(locations) - used if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ModelLoadError(
            f"{folder}: tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) is not used by a "
            f"{config.model_type} model with this config.json: the folder and its config disagree"
        )
    return params


def from_pretrained(
    path: str | Path,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: str = "none",
    train_layers: str = "auto",
) -> Decoder:
    """Load a Hugging Face folder (config.json + safetensors) as our NNX decoder."""
    resolve_dtype(dtype, "dtype")
    path = Path(path).expanduser()
    hf_config = read_hf_config(path)
    config = DecoderConfig.from_hf(
        hf_config, source=str(Path(path) / "config.json"), param_dtype=dtype, compute_dtype=compute_dtype or dtype, remat=remat,
        train_layers=train_layers,
    )
    params = load_hf_params(path, config)
    return build_decoder(config, params)


def build_decoder(config: DecoderConfig, params: dict) -> Decoder:
    """An NNX decoder holding `params` (a pure dict as `nnx.to_pure_dict` makes), without random init."""
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def save_pretrained(model: Decoder, folder: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write an HF folder (config.json + model.safetensors) that `transformers` loads."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {
        "model.embed_tokens.weight": params["embed"],
        "model.norm.weight": params["final_norm"],
    }
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(params["lm_head"].T)
    for name, stacked in params["layers"].items():
        for i in range(config.num_layers):
            tensors[f"model.layers.{i}.{_LAYER_NAMES[name]}"] = _to_hf(name, stacked[i])
    # Stored as float32 whatever the training dtype: numpy has no bfloat16 that transformers reads.
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer_dir is not None:
        import shutil

        for item in Path(tokenizer_dir).iterdir():
            if item.suffix != ".safetensors" and item.name not in ("config.json", "model.safetensors.index.json") and item.is_file():
                shutil.copy2(item, folder / item.name)
    return folder
