"""Hugging Face folders <-> our decoder: read config.json + safetensors, write them back.

HF stores projections as [out, in] matrices; we store them split by head ([embed, heads, head_dim])
and stacked over layers, so import transposes, reshapes and stacks, and export undoes it. Every
tensor is checked against the shape config.json implies, so a folder that does not match its own
config stops here with the file and tensor named, never later with a shape error inside jit.

Given target shardings, every parameter is built from the blocks this process's devices hold
(`jax.make_array_from_callback`), each read from the files as a slice of the HF tensor: a host
reads only its share, and no device or host ever holds a whole copy of the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

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

# Which of our dimensions (per layer: without the stacked layer axis) make up each dimension of
# the HF tensor, in order: ((1, 2), (0,)) is HF [heads * head_dim, embed] for our [embed, heads,
# head_dim]. A block of ours is then a slice of the HF tensor (see `_read_block`); a parameter
# not named here has the HF tensor's layout.
_HF_DIMS = {
    "q_proj": ((1, 2), (0,)), "k_proj": ((1, 2), (0,)), "v_proj": ((1, 2), (0,)), "o_proj": ((2,), (0, 1)),
    "q_bias": ((0, 1),), "k_bias": ((0, 1),), "v_bias": ((0, 1),),
    "gate_proj": ((1,), (0,)), "up_proj": ((1,), (0,)), "down_proj": ((1,), (0,)),
    "lm_head": ((1,), (0,)),
}


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


def _read_block(tensor, hf_dims: tuple, shape: tuple, index: tuple) -> np.ndarray:
    """The block `index` (slices of our dimensions) of one HF tensor in our layout `shape`, read
    from `tensor` (`safe_open(...).get_slice(name)`) as only the part of the file it needs. A
    merged HF dimension is read as one contiguous range when the dimensions after its first are
    whole in the block (head_dim always is), else whole and cut after the reshape."""
    ranges = [range(*cut.indices(size)) for cut, size in zip(index, shape)]
    hf_index, split, cut_after = [], [], set()
    for group in hf_dims:
        first, rest = group[0], group[1:]
        inner = math.prod(shape[d] for d in rest)
        if all(len(ranges[d]) == shape[d] for d in rest):
            hf_index.append(slice(ranges[first].start * inner, ranges[first].stop * inner))
            split += [len(ranges[first])] + [shape[d] for d in rest]
        else:
            hf_index.append(slice(None))
            split += [shape[d] for d in group]
            cut_after.update(group)
    block = np.asarray(tensor[tuple(hf_index)]).reshape(split)
    block = block.transpose(np.argsort([d for group in hf_dims for d in group]))
    if cut_after:
        block = block[tuple(slice(r.start, r.stop) if d in cut_after else slice(None) for d, r in enumerate(ranges))]
    return block


def load_hf_params(folder: str | Path, config: DecoderConfig, shardings: Optional[dict] = None) -> dict:
    """Check every tensor (present, shape, none left over), then return our pure parameter dict
    in the param dtype.

    `shardings` (our pure dict's structure, a `jax.sharding.Sharding` per parameter): each
    parameter is a global array built from the blocks this process's devices hold, each read
    from the files as a slice. Without it: whole arrays on the default device."""
    folder = Path(folder).expanduser()
    dtype = resolve_dtype(config.param_dtype, "model.param_dtype")
    locations = _safetensor_files(folder)
    handles = {}

    def tensor(name: str, expected: tuple[int, ...]):
        """The lazy slice of `name` in its file, its shape checked."""
        if name not in locations:
            raise ModelLoadError(f"{folder}: tensor {name!r} is missing from the safetensors files (config.json implies it)")
        file = locations[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="numpy")
        lazy = handles[file].get_slice(name)
        if tuple(lazy.get_shape()) != tuple(expected):
            raise ModelLoadError(
                f"{file}: tensor {name!r} has shape {tuple(lazy.get_shape())} but config.json implies {tuple(expected)}"
            )
        return lazy

    # Our parameter (its path) -> its HF tensors (one, or one per layer), our shape of each, the HF dims.
    v, d = config.vocab_size, config.hidden_size
    plan = {("embed",): (["model.embed_tokens.weight"], (v, d)), ("final_norm",): (["model.norm.weight"], (d,))}
    if not config.tie_word_embeddings:
        plan[("lm_head",)] = (["lm_head.weight"], (d, v))
    for name, (shape, _) in layer_param_shapes(config).items():
        plan[("layers", name)] = ([f"model.layers.{i}.{_LAYER_NAMES[name]}" for i in range(config.num_layers)], tuple(shape))
    lazy, hf_dims = {}, {}
    for key, (names, shape) in plan.items():
        hf_dims[key] = _HF_DIMS.get(key[-1], tuple((i,) for i in range(len(shape))))
        expected = tuple(math.prod(shape[i] for i in group) for group in hf_dims[key])
        lazy[key] = [tensor(name, expected) for name in names]
    used = {name for names, _ in plan.values() for name in names}
    if config.tie_word_embeddings and "lm_head.weight" in locations:
        used.add("lm_head.weight")  # some tied exports still write the shared matrix
    unexpected = sorted(n for n in set(locations) - used if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ModelLoadError(
            f"{folder}: tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) is not used by a "
            f"{config.model_type} model with this config.json: the folder and its config disagree"
        )

    params: dict = {"layers": {}}
    for key, (names, shape) in plan.items():
        stacked = key[0] == "layers"

        def block(index, key=key, shape=shape, stacked=stacked):
            if not stacked:
                return _read_block(lazy[key][0], hf_dims[key], shape, index).astype(dtype)
            layers = range(*index[0].indices(config.num_layers))
            return np.stack([_read_block(lazy[key][i], hf_dims[key], shape, index[1:]) for i in layers]).astype(dtype)

        full = (config.num_layers, *shape) if stacked else shape
        if shardings is None:
            value = jnp.asarray(block(tuple(slice(None) for _ in full)))
        else:
            target = shardings[key[0]] if not stacked else shardings["layers"][key[1]]
            value = jax.make_array_from_callback(full, target, block)
        if stacked:
            params["layers"][key[1]] = value
        else:
            params[key[0]] = value
    return params


def from_pretrained(
    path: str | Path,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: str = "none",
    train_layers: str = "auto",
    shardings_for: Optional[Any] = None,
    attention: str = "auto",
    attention_block: int = 512,
) -> Decoder:
    """Load a Hugging Face folder (config.json + safetensors) as our NNX decoder.

    `shardings_for(abstract_state)`: the target sharding of every parameter (e.g.
    `lambda state: sharding.param_shardings(state, mesh)`); each host then reads only the blocks
    its devices hold."""
    resolve_dtype(dtype, "dtype")
    path = Path(path).expanduser()
    config = hf_decoder_config(path, dtype, compute_dtype, remat, train_layers, attention, attention_block)
    shardings = None
    if shardings_for is not None:
        abstract = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
        shardings = nnx.to_pure_dict(shardings_for(abstract))
    return build_decoder(config, load_hf_params(path, config, shardings))


def hf_decoder_config(path: str | Path, dtype: str = "float32", compute_dtype: str | None = None, remat: str = "none",
                      train_layers: str = "auto", attention: str = "auto", attention_block: int = 512) -> DecoderConfig:
    """The architecture of an HF folder (its config.json), with our dtypes and options."""
    return DecoderConfig.from_hf(
        read_hf_config(path), source=str(Path(path) / "config.json"), param_dtype=dtype, compute_dtype=compute_dtype or dtype,
        remat=remat, train_layers=train_layers, attention=attention, attention_block=attention_block,
    )


def build_decoder(config: DecoderConfig, params: dict) -> Decoder:
    """An NNX decoder holding `params` (a pure dict as `nnx.to_pure_dict` makes), without random init."""
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def save_pretrained(model: Decoder, folder: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write an HF folder (config.json + model.safetensors) that `transformers` loads."""
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return save_hf_params(model.config, params, folder, tokenizer_dir)


def save_hf_params(config: DecoderConfig, params: dict, folder: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """`save_pretrained` of our pure parameter dict as float32 NumPy arrays."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
