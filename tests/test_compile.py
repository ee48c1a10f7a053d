"""`python -m pacs_jax compile`: ahead-of-time TPU compilation on this CPU with libtpu.

A tiny config compiles for v5e-4 and v5p-16 and its per-chip figures match closed forms (the
train state's bytes from the architecture, the KV cache's bytes from the rollout's shape); an
oversized model fails with the out-of-memory advice; bad names and meshes fail before compiling.
Product names are checked against Cloud TPU's documented slice shapes and libtpu's own topology.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from pacs_jax import compile_tpu
from pacs_jax.__main__ import main
from pacs_jax.config import ConfigError, load_config

_problem = compile_tpu.libtpu_problem()
pytestmark = pytest.mark.skipif(_problem is not None, reason=f"TPU AOT compilation unavailable: {_problem}")

# Widths that are multiples of the TPU's (8, 128) tiles, so XLA pads nothing and per-chip bytes
# can be compared with a closed form. Every weight has an `embed` axis, so FSDP splits all of it.
ARCH = dict(model_type="llama", vocab_size=1024, hidden_size=1024, intermediate_size=1024,
            num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 64, 4, 32, 224
# What the paper configs use (tests/test_configs.py checks they still do): float32 parameters,
# bfloat16 compute, full remat, and a prompt prefilled in chunks (here two of 16 tokens).
TINY = {
    "model": {"arch": ARCH, "param_dtype": "float32", "compute_dtype": "bfloat16", "remat": "full"},
    "data": {"max_prompt_tokens": PROMPT_LEN},
    "rollout": {"group_size": GROUP, "max_new_tokens": NEW_TOKENS, "prompt_buckets": [PROMPT_LEN], "prefill_chunk": 16},
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    # Two mini-batches: with one, the trainer runs no old-log-prob pass (the update's first
    # mini-batch computes its own, on-policy) and there would be nothing to check.
    "trainer": {"prompts_per_step": PROMPTS, "mini_batches": 2, "micro_batches": 1},
}


def write_config(tmp_path, tree) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML
    return str(path)


def tiny_overrides() -> list[str]:
    return [f"{section}.{key}={json.dumps(value)}" for section, keys in TINY.items() for key, value in keys.items()]


def train_state_bytes() -> int:
    """float32 weights + AdamW's two float32 moments, from the architecture alone."""
    d, f, v, layers = ARCH["hidden_size"], ARCH["intermediate_size"], ARCH["vocab_size"], ARCH["num_hidden_layers"]
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o (8 heads x 128 = d), gate/up/down, two norms
    weights = 2 * v * d + layers * per_layer + d  # embedding, LM head (untied), final norm
    return 3 * 4 * weights


def update_batch_bytes(packed_positions: int = 0) -> int:
    """The update's batch as the trainer builds it; with packing, also ids, segment ids and
    positions over `packed_positions` and the [N, T] take indices (int32)."""
    rows = PROMPTS * GROUP
    int32_columns = 2 * PROMPT_LEN + 2 * NEW_TOKENS  # prompt ids/mask, response ids/mask
    padded = 4 * rows * (int32_columns + 1 + 2 * NEW_TOKENS)  # + rewards, old and sampler log-probs (float32)
    return padded + (4 * (3 * packed_positions + rows * NEW_TOKENS) if packed_positions else 0)


def kv_cache_bytes(rows: int = PROMPTS * GROUP) -> int:
    """Keys and values of `rows` responses for every layer, bfloat16."""
    head_dim = ARCH["hidden_size"] // ARCH["num_attention_heads"]
    return 2 * 2 * ARCH["num_hidden_layers"] * rows * ARCH["num_key_value_heads"] * (PROMPT_LEN + NEW_TOKENS) * head_dim


def check_against_closed_forms(programs: dict, chips: int, kv_cache_in_hbm: bool) -> None:
    for report in programs.values():
        assert report["fits"] and not report["error"]
        if report["name"] in ("load", "init"):
            continue  # no program / no matmuls: checked below
        for key in ("argument_bytes", "output_bytes", "peak_bytes", "code_bytes", "xla_flops", "model_flops"):
            assert report[key] > 0, (report["name"], key)
    weights = train_state_bytes() / 3
    if "load" in programs:  # each chip's share of the float32 weights, nothing else
        assert programs["load"]["peak_bytes"] == pytest.approx(weights / chips, rel=0.01)
    if "init" in programs:  # from the policy's shards, Adam's two moments in theirs
        init = programs["init"]
        assert init["argument_bytes"] == pytest.approx(weights / chips, rel=0.01)  # the policy, resident
        assert init["output_bytes"] == pytest.approx(2 * weights / chips, rel=0.01)
        assert init["peak_bytes"] < 1.5 * (init["argument_bytes"] + init["output_bytes"])
    if "update" in programs:
        update = programs["update"]
        expected = (train_state_bytes() + update_batch_bytes()) / chips
        assert update["argument_bytes"] == pytest.approx(expected, rel=0.01)
        # The state is donated: the new state reuses its buffers.
        assert update["alias_bytes"] == pytest.approx(train_state_bytes() / chips, rel=0.01)
        assert update["temp_bytes"] > 0
    if kv_cache_in_hbm:
        # The cache is split over the chips: at least its share, far less than a whole copy.
        kv = kv_cache_bytes() / chips
        assert kv <= programs["rollout"]["temp_bytes"] <= 2.5 * kv


@pytest.mark.slow
def test_tiny_config_compiles_for_v5e_4(tmp_path, capsys):
    paper = load_config(Path(__file__).parents[1] / "configs" / "qwen2.5_7b_pacs.yaml")
    for key in ("param_dtype", "compute_dtype", "remat"):
        assert TINY["model"][key] == getattr(paper.model, key)
    assert 0 < TINY["rollout"]["prefill_chunk"] < PROMPT_LEN
    out = tmp_path / "report.json"
    code = main(["compile", "--config", write_config(tmp_path, TINY), "--topology", "v5e-4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "fits: every program compiles for v5e-4" in printed
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and report["fits"]
    assert report["model"]["remat"] == "full" and report["model"]["compute_dtype"] == "bfloat16"
    assert report["hbm_bytes"] == 16 * 2**30
    programs = {p["name"]: p for p in report["programs"]}
    assert set(programs) == {"load", "init", "rollout", "old_logprobs", "update"}
    # v5e keeps a cache this small in on-chip VMEM, which HBM figures do not count: check it on v5p.
    check_against_closed_forms(programs, chips=4, kv_cache_in_hbm=False)


@pytest.mark.slow
def test_tiny_config_compiles_for_v5p_16_multi_host():
    config = load_config(None, tiny_overrides())
    report = compile_tpu.compile_for_topology(config, compile_tpu.parse_topology("v5p-16"), programs=["rollout"])
    assert (report.chips, report.hosts, report.mesh["fsdp"]) == (8, 2, 8)
    check_against_closed_forms({p.name: dataclasses.asdict(p) for p in report.programs}, chips=8, kv_cache_in_hbm=True)


def test_oversized_model_fails_with_out_of_memory_advice(tmp_path, capsys):
    huge = {**TINY, "model": {**TINY["model"], "arch": {**ARCH, "hidden_size": 8192, "intermediate_size": 28672,
                                                         "num_hidden_layers": 80, "num_attention_heads": 64,
                                                         "num_key_value_heads": 8, "vocab_size": 32768}}}
    code = main(["compile", "--config", write_config(tmp_path, huge), "--topology", "v5e-4", "--programs", "update"])
    captured = capsys.readouterr()
    assert code == 1
    assert "does not fit in the 16.00 GiB of HBM per chip of v5e-4" in captured.err
    assert "update:" in captured.err and "trainer.micro_batches" in captured.err and "model.remat=full" in captured.err


# Cloud TPU's documented slices: (chips, hosts, shape). v4/v5p names count TensorCores.
DOCUMENTED = {
    "v4-8": (4, 1, (2, 2, 1)), "v4-16": (8, 2, (2, 2, 2)), "v4-32": (16, 4, (2, 2, 4)),
    "v5p-8": (4, 1, (2, 2, 1)), "v5p-16": (8, 2, (2, 2, 2)), "v5p-64": (32, 8, (2, 4, 4)), "v5p-128": (64, 16, (4, 4, 4)),
    "v5e-1": (1, 1, (1, 1)), "v5e-4": (4, 1, (2, 2)), "v5litepod-8": (8, 1, (2, 4)), "v5litepod-16": (16, 4, (4, 4)),
    "v5e-256": (256, 64, (16, 16)), "v6e-8": (8, 1, (2, 4)), "v6e-64": (64, 16, (8, 8)),
    "v5e:2x2": (4, 1, (2, 2)), "v5p:2x4x4": (32, 8, (2, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_topology_names_match_the_documented_slices_and_libtpu(name):
    chips, hosts, shape = DOCUMENTED[name]
    topology = compile_tpu.parse_topology(name)
    assert (topology.chips, topology.hosts, topology.shape) == (chips, hosts, shape)
    devices = compile_tpu.tpu_devices(topology)  # libtpu's own description of the slice
    assert len(devices) == chips
    assert len({d.process_index for d in devices}) == hosts


@pytest.mark.parametrize("name", ["v5z-8", "v5p-48", "v5e-12", "v5p:3x3x3", "tpu"])
def test_unknown_topology_fails_before_compiling_with_the_known_list(tmp_path, capsys, name):
    assert main(["compile", "--config", write_config(tmp_path, TINY), "--topology", name]) == 2
    err = capsys.readouterr().err
    assert f"unknown TPU topology {name!r}" in err
    assert "v5p-64" in err and "v5e-4" in err and "v4-8" in err and "v6e-8" in err


@pytest.mark.parametrize("overrides, topology, message", [
    (["model.arch.num_key_value_heads=2", "mesh.fsdp=1", "mesh.tensor=-1"], "v5e-8", "mesh.tensor=8 must divide"),
    (["mesh.data=3", "mesh.fsdp=1"], "v5e-4", "but there are 4 devices"),
    (["trainer.prompts_per_step=6"], "v5e-4", "trainer.prompts_per_step=6 must be divisible by"),
])
def test_bad_mesh_or_batch_fails_before_compiling(overrides, topology, message):
    config = load_config(None, tiny_overrides() + overrides)
    with pytest.raises(ConfigError, match=message):
        compile_tpu.compile_for_topology(config, compile_tpu.parse_topology(topology))


def test_architecture_comes_from_arch_file_or_model_folder_without_weights(tmp_path):
    folder = tmp_path / "Qwen2.5-3B"
    config = load_config(None, [f"model.path={folder}"])
    with pytest.raises(ConfigError, match="has no config.json .* --arch configs/arch/qwen2.5-7b.json"):
        compile_tpu.decoder_config_for(config)
    folder.mkdir()
    (folder / "config.json").write_text((Path(__file__).parents[1] / "configs/arch/qwen2.5-3b.json").read_text())
    from_folder, _ = compile_tpu.decoder_config_for(config)
    from_file, _ = compile_tpu.decoder_config_for(config, str(folder / "config.json"))
    # Qwen2.5-3B's model card: 36 layers, 16 query / 2 KV heads of 128, tied embeddings, q/k/v biases.
    assert from_folder == from_file
    assert (from_folder.num_layers, from_folder.num_heads, from_folder.num_kv_heads, from_folder.head_dim) == (36, 16, 2, 128)
    assert from_folder.tie_word_embeddings and from_folder.qkv_bias


def test_model_arch_takes_the_vocabulary_of_a_tokenizer_that_needs_no_download(tmp_path):
    from pacs_jax.models.tokenizer import CharTokenizer

    arch = {k: v for k, v in ARCH.items() if k not in ("model_type", "vocab_size")}
    char = CharTokenizer()
    decoder_config, hf = compile_tpu.decoder_config_for(load_config(None, ["model.tokenizer=char", f"model.arch={json.dumps(arch)}"]))
    assert decoder_config.vocab_size == char.vocab_size and hf["eos_token_id"] == list(char.eos_ids)
    bigger, _ = compile_tpu.decoder_config_for(load_config(None, ["model.tokenizer=char", f"model.arch={json.dumps({**arch, 'vocab_size': 256})}"]))
    assert bigger.vocab_size == 256  # as the trainer: model.arch may ask for more rows than the tokenizer has
    with pytest.raises(ConfigError, match=r"model.arch.vocab_size=64 is smaller than the tokenizer's 128"):
        compile_tpu.decoder_config_for(load_config(None, ["model.tokenizer=char", f"model.arch={json.dumps({**arch, 'vocab_size': 64})}"]))
    absent = load_config(None, [f"model.tokenizer={tmp_path / 'not_downloaded'}", f"model.arch={json.dumps(arch)}"])
    with pytest.raises(ConfigError, match=r"model.arch needs vocab_size .* set model.arch.vocab_size"):
        compile_tpu.decoder_config_for(absent)


@pytest.mark.slow
def test_compact_engine_compiles_each_program_with_the_cache_split_over_the_chips(capsys):
    config = load_config(None, tiny_overrides() + ["rollout.engine=compact", "rollout.compact_buckets=8",
                                                   "rollout.compact_max_keep=0.6"])
    report = compile_tpu.compile_for_topology(config, compile_tpu.parse_topology("v5e-4"), programs=["rollout"])
    rows, chips, quantum = PROMPTS * GROUP, 4, PROMPTS * GROUP // 8
    # The worst regroup: to the largest bucket (multiple of the quantum) at most 0.6 of the rows.
    largest = int(0.6 * rows) // quantum * quantum
    programs = {p.name: p for p in report.programs}
    assert list(programs) == ["rollout _start", f"rollout _decode {rows} rows", f"rollout _regroup {rows}->{largest}",
                              f"rollout _regroup {rows}->{quantum}", f"rollout _decode {quantum} rows", "rollout _finish"]
    assert report.model["rollout_engine"] == "compact" and report.fits
    for p in programs.values():
        assert p.fits and not p.error and p.peak_bytes > 0, p.name
    full, small = programs[f"rollout _decode {rows} rows"], programs[f"rollout _decode {quantum} rows"]
    # A decode chunk reads its rows' cache split over the chips as _start splits it (its share, plus
    # the weights' share; not a copy per chip) and donates it.
    for p, n in ((full, rows), (small, quantum)):
        assert kv_cache_bytes(n) / chips <= p.argument_bytes <= (kv_cache_bytes(n) + train_state_bytes() / 3 * 1.1) / chips
        assert p.alias_bytes >= kv_cache_bytes(n) / chips
    # Analytic FLOPs of one compact_every-step chunk: 2 x matmul weights x rows x steps, per chip.
    weights = ARCH["vocab_size"] * ARCH["hidden_size"] + 7 * ARCH["hidden_size"] ** 2  # LM head; q, k, v, o, 3 MLP (f = d)
    assert full.model_flops == pytest.approx(2 * weights * rows * config.rollout.compact_every / chips)
    # The worst regroup reads the full batch's cache and writes the largest allowed bucket's, each
    # chip its own share of both (not the kept rows whole on every chip).
    worst = programs[f"rollout _regroup {rows}->{largest}"]
    assert kv_cache_bytes(rows) / chips <= worst.argument_bytes <= kv_cache_bytes(rows) / chips * 1.1
    assert kv_cache_bytes(largest) / chips <= worst.output_bytes <= kv_cache_bytes(largest) / chips * 1.1
    top = compile_tpu.compact_peak(report)
    assert top.peak_bytes == max(p.peak_bytes for p in programs.values())
    printed = compile_tpu.format_report(report)
    assert f"compact engine peak: {top.peak_bytes / 2**30:.2f} GiB per chip, set by {top.name[len('rollout '):]}" in printed
    assert "rollout engine: compact (every 32 steps, 8 buckets, a regroup keeps at most 0.6 of the running rows" in printed


def test_rlvr_lengths_are_the_rollout_bench_draw():
    from bench.rollout_lengths import response_lengths

    for rows, cap in ((4096, 4096), (300, 224)):
        drawn = compile_tpu.rlvr_response_lengths(rows, cap)
        assert (drawn == response_lengths("rlvr", rows, cap, seed=compile_tpu.PACK_SEED)).all()
    lengths = compile_tpu.rlvr_response_lengths(200_000, 4096)
    assert lengths.mean() == pytest.approx(4096 / 4, rel=0.08)  # a quarter of the cap (less the clipped tail)
    assert (lengths == 4096).mean() == pytest.approx(0.03, abs=0.003)


@pytest.mark.slow
def test_packed_passes_compile_at_the_rows_the_trainer_would_pack(capsys):
    import numpy as np

    from pacs_jax.packing import pack_rollout

    row_tokens = 512
    config = load_config(None, tiny_overrides() + [f"trainer.pack_row_tokens={row_tokens}", "trainer.mini_batches=2",
                                                   "trainer.micro_batches=2"])
    report = compile_tpu.compile_for_topology(config, compile_tpu.parse_topology("v5e-4"), programs=["old_logprobs", "update"])
    pack = report.model["packing"]
    # The trainer's own packing of the assumed lengths (bench/rollout_lengths.py's rlvr draw after
    # PACK_PROMPT_TOKENS-token prompts, here capped by the 32-token bucket): its fullest micro-batch.
    rows, micro = PROMPTS * GROUP, 4
    responses = compile_tpu.rlvr_response_lengths(rows, NEW_TOKENS)
    prompt_mask = np.ones((rows, PROMPT_LEN), np.int32)
    response_mask = (np.arange(NEW_TOKENS)[None] < responses[:, None]).astype(np.int32)
    _, stats = pack_rollout(prompt_mask, prompt_mask, response_mask, response_mask, micro_batches=micro, row_tokens=row_tokens,
                            row_multiple=4)
    assert pack["fullest_rows"] == stats["pack/rows_needed"]
    assert pack["rows_per_micro"] >= stats["pack/rows_per_micro_batch"]
    assert pack["rows_per_micro"] < rows // micro  # fewer rows than padded: the test means something
    assert pack["rows_per_micro"] % 4 == 0 and pack["rows"] == micro * pack["rows_per_micro"]
    programs = {p.name: dataclasses.asdict(p) for p in report.programs}
    assert report.fits and set(programs) == {"old_logprobs", "update"}
    positions = pack["rows"] * row_tokens
    update = programs["update"]
    assert update["argument_bytes"] == pytest.approx((train_state_bytes() + update_batch_bytes(positions)) / 4, rel=0.01)
    weights = ARCH["vocab_size"] * ARCH["hidden_size"] + 7 * ARCH["hidden_size"] ** 2
    # Forward + backward + remat recompute over the packed positions; the old-log-prob pass skips
    # the first of two mini-batches (the update computes it on-policy).
    assert update["model_flops"] == pytest.approx(2 * weights * positions * 4 / 4)
    assert programs["old_logprobs"]["model_flops"] == pytest.approx(2 * weights * positions / 2 / 4)
    printed = compile_tpu.format_report(report)
    assert f"{micro} micro-batches x {pack['rows_per_micro']} rows of {row_tokens} tokens" in printed
    assert "rlvr responses" in printed
