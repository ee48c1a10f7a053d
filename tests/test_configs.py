"""Every shipped config loads, validates and splits over the machine it is meant for; every sweep
expands into runs whose configs validate; and CI's rule on skips (tests/conftest.py) holds.

The paper configs say in their header which TPU slice and architecture they are for (the
`python -m pacs_jax compile ... --topology T --arch A` line): the mesh and the batch are split
over libtpu's own description of that slice, as the trainer splits them before compiling.
"""

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
import yaml

from pacs_jax import compile_tpu, sharding
from pacs_jax.config import load_config, to_dict
from pacs_jax.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.y*ml"))
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.y*ml"))
PAPER = [p for p in CONFIGS if p.name.startswith("qwen2.5_")]
COMPILE_LINE = re.compile(r"python -m pacs_jax compile --config (\S+) --topology (\S+) --arch (\S+)")


def test_the_shipped_configs_are_all_here():
    names = {p.name for p in CONFIGS}
    assert {"debug_cpu.yaml", "smollm2_cpu.yaml", "smollm2_learn.yaml"} <= names
    # The paper's grid: PACS (beta 1 and 2), GRPO and PPO on Qwen2.5-3B and 7B.
    assert {p.name for p in PAPER} == {f"qwen2.5_{size}_{algo}.yaml" for size in ("3b", "7b")
                                       for algo in ("pacs", "pacs_beta2", "grpo", "ppo")}
    assert SWEEPS


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix.startswith("model.arch") and f"{prefix}{key}" not in ("model.arch", "data.val", "data.chat_template_kwargs"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_validates_and_keeps_every_value(path):
    config = load_config(path)
    loaded = to_dict(config)
    written = yaml.safe_load(path.read_text())
    for dotted, value in _leaves(written):
        section, key = dotted.split(".", 1)
        got = loaded[section][key]
        assert got == value, f"{path.name}: {dotted} is {got!r} after loading, the file says {value!r}"


def _mesh_check(config, decoder_config, devices):
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    t = config.trainer
    sharding.validate_mesh_for_model(mesh, decoder_config, t.prompts_per_step, config.rollout.group_size,
                                     mini_batches=t.mini_batches, micro_batches=t.micro_batches)
    return mesh


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_config_splits_over_the_slice_its_header_names(path):
    match = COMPILE_LINE.search(path.read_text())
    assert match, f"{path.name}: the header's compile command is missing"
    config_arg, topology_name, arch = match.groups()
    assert config_arg == f"configs/{path.name}"
    assert (REPO / arch).is_file(), f"{path.name} names {arch}, which does not exist"
    config = load_config(path)
    # What the paper runs use: float32 parameters, bfloat16 compute, full remat, chunked prefill.
    m, r = config.model, config.rollout
    assert (m.param_dtype, m.compute_dtype, m.remat) == ("float32", "bfloat16", "full")
    assert 0 < r.prefill_chunk < max(r.prompt_buckets)
    decoder_config, _ = compile_tpu.decoder_config_for(config, str(REPO / arch))
    topology = compile_tpu.parse_topology(topology_name)
    mesh = _mesh_check(config, decoder_config, compile_tpu.tpu_devices(topology))
    assert math.prod(mesh.shape.values()) == topology.chips


@pytest.mark.parametrize("name", ["debug_cpu.yaml", "smollm2_cpu.yaml", "smollm2_learn.yaml"])
def test_cpu_config_splits_over_one_device_and_over_eight(name, request):
    config = load_config(REPO / "configs" / name)
    if config.model.path:  # SmolLM2's own config.json (downloaded once and cached)
        folder = request.getfixturevalue("smollm2_path")
        config = load_config(REPO / "configs" / name, [f"model.path={folder}"])
    decoder_config, _ = compile_tpu.decoder_config_for(config)
    # smollm2_learn's 4 prompts per step are for one CPU process (2 cores), not 8 devices.
    for devices in (jax.devices()[:1],) if name == "smollm2_learn.yaml" else (jax.devices()[:1], jax.devices()):
        _mesh_check(config, decoder_config, devices)


def test_smollm2_learn_prompts_fit_and_read_as_a_question(smollm2_path):
    from pacs_jax import data
    from pacs_jax.models.tokenizer import load_tokenizer

    config = load_config(REPO / "configs" / "smollm2_learn.yaml", [f"model.path={smollm2_path}"])
    tokenizer = load_tokenizer(str(smollm2_path), config.model.chat_template)
    rows = data.load_rows(config.data.train, config.data)
    examples, dropped = data.build_examples(rows, tokenizer, config.data)
    assert dropped == 0 and len(examples) == config.data.synthetic_size
    first = examples[0]
    assert f"<|im_start|>user\nWhat is {first.problem}? Put your final answer within \\boxed{{}}.<|im_end|>" in first.prompt_text
    assert first.prompt_text.endswith("<|im_start|>assistant")


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_expands_into_runs_whose_configs_validate(path, monkeypatch):
    monkeypatch.chdir(REPO)  # base_config paths are relative to the repository, as the README runs them
    sweep = load_sweep(path)
    runs = expand(sweep)  # loads and validates each run's config
    assert len(runs) == math.prod(len(v) for v in sweep.grid.values()) * max(1, len(sweep.seeds))
    assert len({run.run_dir for run in runs}) == len(runs)
    for run in runs:
        config = to_dict(load_config(sweep.base_config, run.overrides))
        for key, value in run.params.items():
            if key == "seed":
                assert config["trainer"]["seed"] == value
            else:
                section, field = key.split(".", 1)
                assert config[section][field] == value


# ------------------------------------------------------------------ CI's rule on skips

SKIPPING_TESTS = '''
import pytest

def test_needs_tpu():
    pytest.skip("needs a TPU: runs on the chip")

def test_hidden_failure():
    pytest.skip("scipy could not be imported")

@pytest.mark.xfail(reason="expected", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
'''


def _pytest(folder: Path, test_file: str, strict: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    env.pop("PACS_JAX_STRICT_SKIPS", None)
    if strict:
        env["PACS_JAX_STRICT_SKIPS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", "-p", "no:cacheprovider", test_file],
                          cwd=folder, capture_output=True, text=True, timeout=300, env=env)


def test_strict_skips_fail_every_skip_but_the_allowed_ones(tmp_path):
    (tmp_path / "test_skips.py").write_text(SKIPPING_TESTS)
    (tmp_path / "test_import.py").write_text(textwrap.dedent('''
        import pytest
        pytest.importorskip("a_module_that_is_not_installed")

        def test_never_runs():
            pass
    '''))
    lenient = _pytest(tmp_path, "test_skips.py", strict=False)
    assert lenient.returncode == 0, lenient.stdout
    lenient = _pytest(tmp_path, "test_import.py", strict=False)
    assert lenient.returncode == 5 and "1 skipped" in lenient.stdout, lenient.stdout  # 5: no test ran
    strict = _pytest(tmp_path, "test_skips.py", strict=True)
    assert strict.returncode == 1, strict.stdout
    assert "unexpected skip (PACS_JAX_STRICT_SKIPS=1): scipy could not be imported" in strict.stdout
    assert re.search(r"1 failed, 1 passed, 1 skipped, 1 xfailed in", strict.stdout), strict.stdout
    assert "needs a TPU: runs on the chip" in strict.stdout  # reported as an ordinary skip
    # A module that skips itself at import (pytest.importorskip) is an error that stops the run.
    strict = _pytest(tmp_path, "test_import.py", strict=True)
    assert strict.returncode != 0, strict.stdout
    assert "unexpected skip (PACS_JAX_STRICT_SKIPS=1): could not import 'a_module_that_is_not_installed'" in strict.stdout
