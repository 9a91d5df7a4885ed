"""Recipes parse and validate; their targets have the published sizes; launchers render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_minitron.checkpoint.hf_format import description_from_hf_config
from nemo_minitron.errors import UsageError
from nemo_minitron.pipeline.recipe import load_recipe

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DATA = ["data.calib=[/data/calib_text_document]", "data.train=[/data/train_text_document]",
        "data.heldout=[/data/val_text_document]"]
# Published parameter counts of the recipes' targets (Llama-3.1-Minitron 4B width and
# depth: 4.5B; Mistral-NeMo-Minitron 8B: 8.4B; Minitron 8B: 8.27B, its HF model's count;
# Nemotron-H 4B and Nemotron Nano 9B v2: their HF models' 4.49B and 8.89B; Nemotron 3 Nano
# 22B-A3.0B: ModelOpt's tutorial, 22.28B); None where no such model was published.
PUBLISHED_B = {"llama3.1-8b-4b-width": 4.5, "llama3.1-8b-4b-depth": 4.5, "mistral-nemo-12b-8b": 8.4,
               "nemotron-15b-8b": 8.27, "qwen2.5-7b-3b": None, "smollm2-135m-to-84m": None,
               "qwen3-30b-a3b-experts": None, "nemotron-h-8b-4b": 4.49, "nemotron-nano-12b-9b": 8.89,
               "nemotron-3-nano-30b-a3b-22b": 22.28}


def _source_description(source: str):
    config = ROOT / "tests" / "data" / "hf_configs" / f"{source.replace('/', '__')}.json"
    return description_from_hf_config(json.loads(config.read_text()))


def test_every_recipe_is_covered():
    assert {load_recipe(p, DATA).name for p in RECIPES} == set(PUBLISHED_B)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_targets_published_size(path):
    from nemo_minitron.prune.api import planned_description

    recipe = load_recipe(path, DATA)
    assert recipe.parallel.tp >= 1 and recipe.rounds and all(r.distill.steps > 0 for r in recipe.rounds)
    if recipe.model.source == "smollm2-135m":
        from nemo_minitron.checkpoint.hf_import import resolve_source

        desc = resolve_source("smollm2-135m").description
    else:
        desc = _source_description(recipe.model.source)
    for rnd in recipe.rounds:
        desc = planned_description(desc, rnd.prune, tp=recipe.parallel.tp, pp=recipe.parallel.pp)
    published = PUBLISHED_B[recipe.name]
    if published is not None:
        assert abs(desc.num_parameters() / 1e9 - published) < 0.05 * published
    if recipe.name == "smollm2-135m-to-84m":
        assert 80e6 < desc.num_parameters() < 95e6
    if recipe.name == "nemotron-15b-8b":  # nvidia/Minitron-8B-Base's shape
        assert (desc.architecture, desc.hidden_size, desc.ffn_hidden_size, desc.num_attention_heads,
                desc.num_query_groups, desc.head_dim, desc.num_layers) == ("nemotron", 4096, 16384, 48, 8, 128, 32)
    if recipe.name == "nemotron-h-8b-4b":  # nvidia/Nemotron-H-4B-Base-8K's shape
        assert (desc.hidden_size, desc.mamba_num_heads, desc.mamba_head_dim, desc.ffn_hidden_size,
                desc.hybrid_pattern) == (3072, 112, 64, 12288, "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-")
    if recipe.name == "nemotron-nano-12b-9b":  # nvidia/NVIDIA-Nemotron-Nano-9B-v2's shape (layer kinds counted)
        assert (desc.hidden_size, desc.ffn_hidden_size, desc.mamba_num_heads, desc.mamba_head_dim,
                desc.num_attention_heads, desc.num_layers) == (4480, 15680, 128, 80, 40, 56)
        assert [desc.hybrid_pattern.count(s) for s in "M*-"] == [27, 4, 25]
    if recipe.name == "nemotron-3-nano-30b-a3b-22b":  # ModelOpt 0.47 tutorial's best subnet: 22.28B, 3.00B active
        assert (desc.hidden_size, desc.num_experts, desc.moe_ffn_hidden_size, desc.moe_shared_ffn_hidden_size,
                desc.mamba_num_heads, desc.mamba_head_dim, desc.num_layers) == (2304, 104, 1856, 3072, 64, 64, 52)
        assert round(desc.num_parameters() / 1e7) == 2228 and round(desc.num_active_parameters() / 1e7) == 300
    if recipe.name == "qwen3-30b-a3b-experts":  # half the experts: ~16B total, the active count kept
        assert (desc.num_experts, desc.moe_top_k, desc.moe_ffn_hidden_size, desc.num_layers) == (64, 8, 768, 48)
        assert round(desc.num_parameters() / 1e9) == 16 and int(desc.num_active_parameters() / 1e8) == 33



def test_nemotron_3_memory_matches_modelopts_report():
    # ModelOpt 0.47's tutorial prints, for the 30B-A3B at bf16, sequence 8192 and batch 8:
    # KV cache 384.0 MB and Mamba state 190.5 MB (MiB), unchanged by its 22B width prune
    desc = _source_description("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16")
    assert desc.kv_cache_bytes_per_token() * 8192 * 8 == 384 * 2**20
    assert desc.ssm_state_bytes() * 8 / 2**20 == pytest.approx(190.5, abs=0.05)

def test_cluster_recipes_need_only_data_paths():
    for path in RECIPES:
        if "smollm2" in path.name:
            continue
        with pytest.raises(UsageError, match=r"data\.calib"):
            load_recipe(path)


@pytest.mark.parametrize("override, words", [
    ("rounds.0.distill.stepz=3", ["unknown recipe key", "stepz", "steps"]),
    ("distill.steps=3", ["unknown recipe key 'distill.steps'", "did you mean 'rounds.0.distill.steps'"]),
    ("colour=blue", ["unknown recipe key 'colour'"]),
    ("rounds.0.importance.batch_agg=median", ["batch_agg", "mean, l2, var"]),
    ("rounds.0.distill.global_batch=7", ["global_batch", "multiple"]),
    ("rounds.0.prune.target_params=90M", ["exactly one of"]),
    ("rounds.0.sparsify={pattern: 2-4}", ["recipe key 'rounds.0.sparsify.pattern' must be N:M"]),
    ("rounds.0.sparsify={at: during}", ["rounds.0.sparsify.at", "before_distill, after_distill"]),
])
def test_bad_recipe_values_name_the_key(override, words):
    with pytest.raises(UsageError) as e:
        load_recipe(ROOT / "recipes" / "smollm2-135m.yaml", [override])
    for word in words:
        assert word in str(e.value)


def test_overrides_apply():
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m.yaml",
                         ["rounds.0.distill.steps=3", "output_dir=/tmp/x", "data.train=[a.txt,b.jsonl]"])
    assert recipe.rounds[0].distill.steps == 3 and recipe.output_dir == "/tmp/x"
    assert recipe.data.train == ["a.txt", "b.jsonl"]


def _slurm():
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_launcher", ROOT / "launchers" / "slurm.py")
    slurm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slurm)
    return slurm


def test_slurm_script_for_two_nodes_of_eight_gpus(tmp_path):
    slurm = _slurm()
    recipe = ROOT / "recipes" / "llama3.1-8b-4b-width.yaml"
    text = slurm.render(str(recipe), DATA, nodes=2, gpus_per_node=8, account="acct", partition="batch",
                        container_image="nvcr.io/nvidia/pytorch:25.09-py3", container_mounts="/lustre:/lustre",
                        setup="pip install -e .",
                        model_config=str(ROOT / "tests" / "data" / "hf_configs" / "meta-llama__Llama-3.1-8B.json"))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--account=acct",
                      "--partition=batch"):
        assert f"#SBATCH {directive}" in lines
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    srun = next(line for line in lines if line.startswith("srun "))
    # one torchrun per node, all meeting at the first host's c10d rendezvous
    for part in ("--ntasks-per-node=1", "--container-image=nvcr.io/nvidia/pytorch:25.09-py3",
                 "--container-mounts=/lustre:/lustre", "torchrun --nnodes=$SLURM_NNODES", "--nproc-per-node=8",
                 "--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT", "--rdzv-id=$SLURM_JOB_ID",
                 "-m nemo_minitron run", str(recipe), 'trap "" USR1; pip install -e . && exec torchrun'):
        assert part in srun, part
    # Slurm warns with SIGUSR1 before the time limit; an unfinished run requeues itself
    assert "#SBATCH --signal=USR1@600" in lines and "#SBATCH --requeue" in lines
    assert lines.index(srun) < lines.index('    scontrol requeue "$SLURM_JOB_ID"')
    assert "tp=2 pp=1 dp=8" in text and "2 nodes x 8 GPUs = 16 ranks" in text
    assert "NCCL" in text and "CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    with pytest.raises(UsageError, match="multiple of the recipe's tp x pp"):
        slurm.render(str(ROOT / "recipes" / "mistral-nemo-12b-8b.yaml"), DATA, nodes=1, gpus_per_node=2)


# Megatron's blend syntax in each recipe form, and a split that leaves out data.heldout
BLENDS = ["data.calib=0.7 /data/a_text_document 0.3 /data/b_text_document",
          "data.train=[{weight: 0.7, path: /data/a_text_document}, {weight: 0.3, path: /data/b_text_document}]",
          "data.heldout=null", "data.split=99,1,0"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_with_blends(path):
    from nemo_minitron.data.blend import blend_words

    recipe = load_recipe(path, BLENDS)
    assert blend_words(recipe.data.calib) == blend_words(recipe.data.train) == [
        (0.7, "/data/a_text_document"), (0.3, "/data/b_text_document")]
    assert recipe.data.heldout is None and recipe.data.split == "99,1,0"


@pytest.mark.parametrize("override, words", [
    ("data.train=0.7 /data/a 0.3", "pairs of weight and source"),
    ("data.train=[{weight: -1, path: /data/a}]", "must be > 0"),
    ("data.split=99;1", "does not parse"),
    ("data.split=0,1,0", "leaves no training part"),
])
def test_bad_recipe_blends_name_the_key(override, words):
    recipe = RECIPES[0]
    with pytest.raises(UsageError, match=words):
        load_recipe(recipe, [*DATA, override])
    with pytest.raises(UsageError, match="data.heldout"):
        load_recipe(recipe, [*DATA, "data.heldout=null"])


@pytest.mark.parametrize("path", [p for p in RECIPES if "smollm2" not in p.name], ids=lambda p: p.stem)
def test_slurm_time_limit_reaches_every_first_checkpoint(path):
    """With the launcher's default --time, every training stage of a published recipe
    checkpoints before Slurm's warning, on one node of 8 GPUs; a save interval too long
    for the time limit is refused, naming the key."""
    slurm = _slurm()
    recipe = load_recipe(path, DATA)
    config = str(ROOT / "tests" / "data" / "hf_configs" / f"{recipe.model.source.replace('/', '__')}.json")
    text = slurm.render(str(path), DATA, nodes=1, gpus_per_node=8, model_config=config)
    desc, d = _source_description(recipe.model.source), recipe.rounds[0].distill
    assert "# first checkpoints (estimated at 400 TFLOP/s per GPU):" in text
    assert f"rounds.0.distill step {d.save_every}" in text
    # FLOPs of the steps to the first checkpoint written out: batch x sequence x (3 student + 1
    # teacher forwards), bounded with the teacher's FLOPs per token for both (the student is smaller)
    seconds = d.save_every * d.global_batch * d.seq_len * 4 * desc.flops_per_token(d.seq_len) / (8 * 400e12)
    assert seconds < slurm.parse_time("04:00:00") - 600
    with pytest.raises(UsageError, match=r"rounds\.0\.distill\.save_every"):
        slurm.render(str(path), [*DATA, "rounds.0.distill.save_every=1000"], nodes=1, gpus_per_node=8,
                     model_config=config)
    assert slurm.parse_time("1-12:00:00") == 36 * 3600 and slurm.parse_time("90") == 90 * 60


def test_recipe_errors_name_the_full_key_and_the_yaml_line(tmp_path):
    """A type error inside a round names the key as a range error does (rounds.0.distill.steps,
    not distill.steps); broken YAML gives FILE:LINE:COLUMN and the parser's words, one line."""
    recipe = tmp_path / "r.yaml"
    head = "model: {source: smollm2-135m}\ndata: {calib: [builtin:calib], train: [builtin:train]"
    for steps, words in (("abc", ": Value 'abc' of type 'str' could not be converted"), ("0", " must be >= 1")):
        recipe.write_text(head + ", heldout: [builtin:heldout]}\nrounds:\n  - prune: {target: {layers: 3}}\n"
                                 f"  - prune: {{target: {{layers: 2}}}}\n    distill: {{steps: {steps}}}\n")
        with pytest.raises(UsageError) as error:
            load_recipe(recipe)
        assert str(error.value).startswith("recipe key 'rounds.1.distill.steps'" + words), error.value
    recipe.write_text(head + "\nrounds:\n  - prune: {target: {layers: 3}}\n")
    with pytest.raises(UsageError) as error:
        load_recipe(recipe)
    assert str(error.value) == f"recipe {recipe}:3:1: while parsing a flow mapping, did not find expected ',' or '}}'"
