"""Megatron-LM / Megatron-Bridge / NeMo 2 checkpoints in and out, the teacher wrapper inside
a Megatron-style training step, and ModelOpt's vocabulary.

One 2-rank run (tests/workers/megatron_interop.py) writes the fixtures with megatron-core
alone (tests/megatron_layouts.py follows the layouts of Megatron-LM, Megatron-Bridge and
NeMo 2: TP=2 and PP=2, stacked and per-layer keys, three vocabulary paddings), reads them
at the other layout, exports one and reloads it strictly as those projects build models,
and runs the integration's forward-backward at TP=2 and PP=2; the tests here compare its
results with Hugging Face and with the project's own trainer, in process at TP=1.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli_in_process, run_workers
from tiny_models import TINY_VOCAB, hf_logits, make_tiny_hf_model, tiny_tokenizer

# fp32 logits of tiny models (sums of <= 96 products per output): two implementations
# differ by rounding, ~1e-7 of O(1) logits per operation; 1e-5 is the acceptance bound.
LOGITS_TOL = 1e-5
# the integration's distillation settings and batches (the worker imports them)
INTEGRATION = dict(temperature=2.0, ce_weight=0.25, chunk_tokens=7, pairs="embedding:embedding,0:2,final_norm:final_norm")
BATCH = dict(global_batch=4, micro_batch=2, seq_len=16, seed=5)


@pytest.fixture(scope="session")
def interop(tiny_hf, tiny_checkpoint, tmp_path_factory, runtime):
    root = tmp_path_factory.mktemp("interop")
    tok = root / "tokenizer"
    tiny_tokenizer().save_pretrained(str(tok))
    tokens = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, root / "tokens.pt")
    spec = {"out": str(root / "out"), "tokens": str(root / "tokens.pt"), "tokenizer": str(tok), "vocab": TINY_VOCAB,
            "mlm_hf": str(tiny_hf("llama31_pruned_shape")),
            "mlm_hf_old": str(make_tiny_hf_model("llama31_pruned_shape", root / "hf_old", seed=1)),
            "bridge_hf": str(tiny_hf("llama_tied")), "nemo_hf": str(tiny_hf("qwen2")),
            "student": str(tiny_checkpoint("llama_small")), "teacher": str(tiny_checkpoint("llama"))}
    (root / "spec.json").write_text(json.dumps(spec))
    run_workers("megatron_interop.py", root / "spec.json", out=root / "out")
    ranks = [torch.load(root / "out" / f"results-rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"spec": spec, "root": root, "out": root / "out", "tokens": tokens, "ranks": ranks,
            "hf": {"megatron_lm": Path(spec["mlm_hf"]), "nemo2": Path(spec["nemo_hf"]),
                   "bridge": Path(spec["bridge_hf"])}}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _logits(path, tokens: torch.Tensor):
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits

    opened = open_model(str(path))
    return full_logits(opened.model, tokens, opened.description.vocab_size), opened


# ---------------------------------------------------------------------- reading
@pytest.mark.multirank
def test_each_layout_reads_at_any_layout_with_the_source_logits(interop, capsys):
    """Megatron-LM (TP=2, stacked, vocab padded to 1152), NeMo 2 (TP=2, module. keys, 1024)
    and Megatron-Bridge (PP=2, per-layer keys, unpadded 1000, tied): read at TP=1 here and
    at the other layout in the worker, the logits are the Hugging Face model's."""
    from nemo_minitron.checkpoint.api import describe_model
    from nemo_minitron.checkpoint.megatron_layout import model_path

    out, res, tokens = interop["out"], interop["ranks"][0], interop["tokens"]
    for name, hf_dir in interop["hf"].items():
        reference = hf_logits(hf_dir, tokens)
        at_tp1, _ = _logits(out / name, tokens)
        assert _diff(at_tp1, reference) <= LOGITS_TOL, name
        other = {"megatron_lm": "megatron_lm@pp2", "nemo2": "nemo2@pp2", "bridge": "bridge@tp2"}[name]
        assert _diff(res[other], reference) <= LOGITS_TOL, other

    desc = describe_model(str(out / "megatron_lm"))  # from common.pt's args
    assert (desc.head_dim, desc.num_query_groups, desc.num_layers, desc.vocab_size) == (24, 2, 5, TINY_VOCAB)
    assert desc.rope_scaling["rope_type"] == "llama3" and desc.rope_scaling["factor"] == 8.0
    assert describe_model(str(out / "nemo2")).qkv_bias                 # from context/model.yaml
    assert describe_model(str(out / "bridge")).tie_embeddings          # from run_config.yaml

    # the tracker says 10; --iteration 5 reads the older weights (another model)
    old = model_path(str(out / "megatron_lm"), 5)
    assert old.endswith("iter_0000005")
    at_5, _ = _logits(old, tokens)
    assert _diff(at_5, hf_logits(Path(interop["spec"]["mlm_hf_old"]), tokens)) <= LOGITS_TOL
    from nemo_minitron.cli import main

    capsys.readouterr()
    code = main(["eval", str(out / "megatron_lm"), "--iteration", "5", "--data", "builtin:heldout", "--seq-len", "16",
                 "--max-tokens", "64"])
    assert code == 0 and "iter_0000005: loss" in capsys.readouterr().out

    # a recipe's model.source / model.iteration: checked and planned before any stage runs
    from nemo_minitron.pipeline.recipe import load_recipe
    from nemo_minitron.pipeline.run import RunPaths, preflight

    recipe_file = interop["root"] / "recipe.yaml"
    recipe_file.write_text(f"model: {{source: {out / 'megatron_lm'}, iteration: 5}}\noutput_dir: {interop['root'] / 'run'}\n"
                           "data: {calib: [builtin:calib], train: [builtin:train], heldout: [builtin:heldout]}\n"
                           "rounds: [{importance: {seq_len: 64}, distill: {seq_len: 64}, "
                           "prune: {target: {ffn_hidden_size: 64}, drop_layers: [5]}}]\n")
    recipe = load_recipe(recipe_file)
    planned = preflight(recipe, RunPaths(Path(recipe.output_dir), recipe))
    assert recipe.model.source.endswith("iter_0000005")
    assert [(d.num_layers, d.ffn_hidden_size) for d in planned] == [(5, 80), (4, 64)]


@pytest.mark.multirank
def test_written_checkpoint_loads_strictly_where_megatron_builds_it(interop):
    """The worker exported the Bridge checkpoint at TP=2 (``--vocab-padding megatron``:
    128 x 2 -> 1024 rows) and loaded it into GPTModels built from common.pt's args as
    Megatron-LM's gpt_builder does and from run_config.yaml as Bridge's provider does,
    with StrictHandling.RAISE_ALL (nothing missing, nothing unexpected)."""
    res = interop["ranks"][0]
    reference = hf_logits(interop["hf"]["bridge"], interop["tokens"])
    assert res["export_args_padded_vocab"] == 1024
    assert _diff(res["export@megatron_lm"], reference) <= LOGITS_TOL
    assert _diff(res["export@bridge"], reference) <= LOGITS_TOL
    written = interop["out"] / "bridge_export"
    assert (written / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (written / "latest_train_state.pt").is_file() and (written / "iter_0000000" / "tokenizer").is_dir()


# ---------------------------------------------------------------------- prune and export
PRUNES = {  # fixture -> (prune keyword arguments in ModelOpt's vocabulary, vocabulary padding of the export)
    "megatron_lm": (dict(target={"num_query_groups": 1, "ffn_hidden_size": 64}, drop_layers=[2, 4]), "96"),
    "nemo2": (dict(target={"hidden_size": 48, "num_attention_heads": 2}, layer_metric="loss"), "none"),
    "bridge": (dict(drop_layers=[1]), "megatron"),
}


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(PRUNES))
def test_each_layout_prunes_and_exports(interop, tmp_path, name):
    """Importance and pruning read the Megatron checkpoint in place (ModelOpt's axis names,
    1-indexed --drop-layers); the pruned model exports to Hugging Face with its logits and
    to Megatron-LM / Bridge, which reloads strictly into Megatron-built models (explicit
    kv_channels, fewer groups, fewer layers; each padding)."""
    import yaml
    from megatron_layouts import gpt_from_args, gpt_from_provider, saved_args, strict_load

    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.prune.api import prune
    from nemo_minitron.runtime.distributed import init_distributed

    source = str(interop["out"] / name)
    kwargs, padding = PRUNES[name]
    compute_importance(source, ["builtin:calib"], str(tmp_path / "imp"), samples=4, seq_len=16, micro_batch=4,
                       layer_samples=2, progress=False)
    pruned = prune(source, str(tmp_path / "imp"), str(tmp_path / "pruned"), **kwargs)
    info = read_info(pruned)
    if name == "megatron_lm":  # 1-indexed 2 and 4 are megatron's decoder.layers.1 and .3
        assert info.provenance["kept"]["layers"] == [0, 2, 4]
        assert (info.description.num_query_groups, info.description.ffn_hidden_size) == (1, 64)
    tokens = interop["tokens"]
    ours, _ = _logits(pruned, tokens)
    export(str(pruned), str(tmp_path / "hf"), megatron_out=str(tmp_path / "mg"), vocab_padding=padding)
    init_distributed(1, 1)
    assert _diff(hf_logits(tmp_path / "hf", tokens), ours) <= LOGITS_TOL
    written = tmp_path / "mg" / "iter_0000000"
    args = saved_args(written)
    expected_rows = {"96": 1056, "none": TINY_VOCAB, "megatron": 1024}[padding]
    assert args.padded_vocab_size == expected_rows and args.kv_channels == info.description.head_dim
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(written))["embedding.word_embeddings.weight"]
    assert tuple(stored.global_shape) == (expected_rows, info.description.hidden_size)
    from nemo_minitron.model.forward import full_logits

    for model in (gpt_from_args(args), gpt_from_provider(yaml.safe_load((written / "run_config.yaml").read_text())["model"])):
        assert _diff(full_logits(strict_load(model, written), tokens, TINY_VOCAB), ours) <= LOGITS_TOL
    if name == "bridge":  # the Megatron checkpoint teaches its pruned student (one step, embedding pair)
        from nemo_minitron.distill.api import distill

        summary = distill(source, str(pruned), ["builtin:train"], str(tmp_path / "kd"), steps=1, global_batch=2,
                          micro_batch=2, seq_len=16, eval_samples=2, kd_pairs=["embedding:embedding"], progress=False).summary
        # depth pruning kept the teacher's embedding: 1 - cos of equal states, zero up to float32 rounding
        assert abs(summary["final_pair_losses"][0]) < 1e-6
        assert (tmp_path / "kd" / "final" / "nemo_minitron.json").is_file()


@pytest.mark.parametrize("kind", ["qwen3", "nemotron", "mixtral", "qwen3_moe"])
def test_other_families_round_trip_through_megatron(tiny_checkpoint, tmp_path, kind):
    """Qwen3 (QK-norm), Nemotron (squared ReLU, zero-centred LayerNorm with biases, half
    rotary), Mixtral and Qwen3-MoE (experts; renormalised top-k; Qwen2-MoE's shared expert:
    tests/test_megatron_moe.py): written as Megatron-LM / Bridge checkpoints, they load
    strictly into the models Megatron builds from their config (a MoE layer's norm keyed as
    the Transformer Engine spec keys it) and read back with the same logits."""
    import yaml
    from megatron_layouts import gpt_from_args, gpt_from_provider, saved_args, strict_load, te_keyed

    from nemo_minitron.checkpoint.api import describe_model, export
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.runtime.distributed import init_distributed

    tokens = torch.randint(0, TINY_VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    ours, opened = _logits(tiny_checkpoint(kind), tokens)
    export(str(tiny_checkpoint(kind)), megatron_out=str(tmp_path / "mg"))
    init_distributed(1, 1)
    assert describe_model(str(tmp_path / "mg")) == opened.description.replace(name=str(tmp_path / "mg" / "iter_0000000"))
    back, _ = _logits(tmp_path / "mg", tokens)
    assert _diff(back, ours) <= LOGITS_TOL
    written = tmp_path / "mg" / "iter_0000000"
    args = saved_args(written)
    for model in (gpt_from_args(args), gpt_from_provider(yaml.safe_load((written / "run_config.yaml").read_text())["model"])):
        assert _diff(full_logits(strict_load(model, written, keys=te_keyed), tokens, TINY_VOCAB), ours) <= LOGITS_TOL


# ---------------------------------------------------------------------- the integration
def _trainer_step(teacher: str, student: str, tp: int = 1, pp: int = 1):
    """The project's own trainer on the integration's settings (at TP=1: the reference)."""
    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, read_info
    from nemo_minitron.config import build
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.distill.api import parse_pairs
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.train import Trainer
    from nemo_minitron.runtime.distributed import init_distributed

    s_desc, t_desc = read_info(student).description, read_info(teacher).description
    seed = BATCH["seed"]
    cfg = build(DistillConfig, kd_temperature=INTEGRATION["temperature"], ce_weight=INTEGRATION["ce_weight"],
                logit_chunk=INTEGRATION["chunk_tokens"], kd_pairs=INTEGRATION["pairs"].split(","), steps=1, lr=1e-3,
                **{k: v for k, v in BATCH.items() if k != "seed"})
    init_distributed(tp, pp, seed)
    samples = check_corpus(["builtin:train"]).dataset(load_tokenizer(student), seq_len=cfg.seq_len, seed=0,
                                                      num_samples=16)
    trainer = Trainer(load_checkpoint(student)[0], load_checkpoint(teacher)[0], samples, None, Path("/nonexistent"),
                      cfg, seed=seed, student_desc=s_desc, teacher_desc=t_desc,
                      pairs=parse_pairs(cfg.kd_pairs, s_desc, t_desc), progress=False)
    logs, grads = trainer.gradients(step=0)
    return logs, grads, trainer


def _hf_pair_losses(trainer, teacher_hf: Path, student_hf: Path) -> list[float]:
    """The three pair losses written out from Hugging Face hidden states: embedding output
    (hidden_states[0]), student layer 0 / teacher layer 2 outputs (hidden_states[1] / [3]),
    and the final norm's output (the last hidden state), the student's projected by the
    trainer's projection; 1 - cosine per token, averaged over tokens and micro-batches."""
    from nemo_minitron.checkpoint.verify import load_hf_model

    hf_s, hf_t = load_hf_model(student_hf), load_hf_model(teacher_hf)
    totals = [0.0, 0.0, 0.0]
    batches = trainer.step_batches(0)
    for batch in batches:
        with torch.no_grad():
            hs = hf_s(batch["tokens"], output_hidden_states=True).hidden_states
            ht = hf_t(batch["tokens"], output_hidden_states=True).hidden_states
        for i, (a, b) in enumerate(((hs[0], ht[0]), (hs[1], ht[3]), (hs[-1], ht[-1]))):
            a = a @ trainer.module.projections[str(i)].weight.detach().T
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            totals[i] += (1 - cos).mean().item() / len(batches)
    return totals


@pytest.mark.multirank
def test_teacher_hook_and_forward_steps_match_the_project_trainer(interop, tiny_hf):
    """teacher_hook + the Megatron-LM forward step (TP=2) and Bridge's (PP=2, a minimal
    state), driven by get_forward_backward_func without adjust_tensor_shapes_fn, give the
    project's trainer's losses and gradients for the same step; pairs on the embedding
    output and the final norm equal the Hugging Face states' losses; step_end sets the
    "auto" pair weights the trainer would."""
    spec = interop["spec"]
    logs, grads, trainer = _trainer_step(spec["teacher"], spec["student"])
    expected_pairs = _hf_pair_losses(trainer, tiny_hf("llama"), tiny_hf("llama_small"))  # the checkpoints' sources
    # fp32 cosines over 48/64-wide states: ~1e-7; the sums over 32 tokens keep well within 1e-5
    assert all(abs(a - b) <= 1e-5 for a, b in zip(logs["pair_losses"], expected_pairs)), (logs, expected_pairs)

    # each token's loss is a difference of float32 terms as large as T^2 ln V (log-sum-exps over
    # the vocabulary): a few float32 epsilons of that, whatever the (small) result
    tol = 8 * torch.finfo(torch.float32).eps * INTEGRATION["temperature"] ** 2 * math.log(TINY_VOCAB)
    # the project's trainer at PP=2 (the embedding pair on stage 0, carried states) logs the same loss
    trainer_pp2 = next(r["trainer@pp2"] for r in interop["ranks"] if "trainer@pp2" in r)
    for key in ("loss", "kd_loss", "ce_loss"):
        assert abs(trainer_pp2[key] - logs[key]) <= tol, key
    # pair losses are means of 1 - cos, O(1) terms: a few float32 epsilons
    assert all(abs(a - b) <= 1e-5 for a, b in zip(trainer_pp2["pair_losses"], logs["pair_losses"]))

    # "auto": the mean of the weighted pair losses matches the step's logit loss: w_i = logit / (n * loss_i)
    n = len(logs["pair_losses"])
    logit_part = logs["kd_loss"] + INTEGRATION["ce_weight"] * logs["ce_loss"]
    expected_weights = [logit_part / (n * p) for p in logs["pair_losses"]]
    for layout in ("tp2", "pp2"):
        parts = [r["integration"][layout] for r in interop["ranks"]]
        reported = next(p["reported"] for p in parts if p["last_stage"])
        sums = {k: sum(r[k][0].item() for r in reported) / sum(r[k][1].item() for r in reported)
                for k in ("distill loss", "kd loss", "lm loss")}
        # the last stage reports its own pairs; at PP=2 the embedding pair (pair 0) is on stage 0
        earlier = logs["pair_weights"][0] * logs["pair_losses"][0] if layout == "pp2" else 0.0
        expected = {"distill loss": logs["loss"] - earlier,
                    "kd loss": logs["kd_loss"], "lm loss": logs["ce_loss"]}
        for key, value in expected.items():
            assert abs(sums[key] - value) <= tol, (layout, key, sums[key], value)
        merged = {}
        for p in parts:
            merged.update(p["grads"])
        assert merged.keys() == grads.keys(), layout
        for key, ref in grads.items():
            # the same fp32 arithmetic split over ranks: differences are rounding, <= 1e-5 of the largest entry
            assert _diff(merged[key], ref) <= 1e-5 * max(ref.abs().max().item(), 1e-8), (layout, key)
        for p in parts:
            assert all(abs(a - b) <= 1e-5 * b for a, b in zip(p["pair_weights"], expected_weights)), layout


# ---------------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_args(iteration_dir: Path, **changes) -> None:
    """Edit a fixture's common state (megatron_layouts.saved_common)."""
    from megatron_layouts import saved_common

    common = saved_common(iteration_dir)
    for key, value in changes.items():
        setattr(common["args"], key, value)
    torch.save(common, iteration_dir / "common.pt")


@pytest.mark.multirank
def test_bad_megatron_input_is_one_line(interop, tmp_path, capsys):
    import yaml

    out = interop["out"]
    cases = []
    no_tracker = _copy(out / "megatron_lm", tmp_path / "no_tracker")
    (no_tracker / "latest_checkpointed_iteration.txt").unlink()
    cases.append((["eval", no_tracker, "--data", "builtin:heldout"], ["latest_checkpointed_iteration.txt", "--iteration", "iterations here: 5, 10"]))
    cases.append((["eval", out / "megatron_lm", "--iteration", "7", "--data", "builtin:heldout"], ["--iteration 7", "does not exist",
                                                                      "iterations here: 5, 10"]))
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    (legacy / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"\0")
    (legacy / "latest_checkpointed_iteration.txt").write_text("3")
    cases.append((["importance", legacy, "--data", "builtin:calib", "--out", tmp_path / "i"],
                  ["legacy Megatron-LM checkpoint", "mp_rank_XX", "torch_dist"]))
    fsdp = tmp_path / "fsdp"
    (fsdp / "iter_0000003").mkdir(parents=True)
    (fsdp / "iter_0000003" / ".metadata").write_bytes(b"\0")
    (fsdp / "latest_checkpointed_iteration.txt").write_text("3")
    cases.append((["export", fsdp, "--hf-out", tmp_path / "h"], ["fsdp_dtensor", "nemo-minitron reads torch_dist"]))
    moe = _copy(out / "bridge", tmp_path / "moe")
    run_config = moe / "iter_0000007" / "run_config.yaml"
    data = yaml.safe_load(run_config.read_text())
    data["model"]["num_moe_experts"] = 8
    run_config.write_text(yaml.safe_dump(data))
    (tmp_path / "x").mkdir()  # an importance directory: prune checks that it exists first
    cases.append((["prune", moe, "--importance", tmp_path / "x", "--out", tmp_path / "p", "--target", "hidden=32"],
                  ["has no tensor", "mlp.router.weight", "run_config.yaml"]))  # experts the weights lack
    mla = _copy(out / "megatron_lm" / "iter_0000010", tmp_path / "mla" / "iter_0000010")
    _rewrite_args(mla, multi_latent_attention=True)
    cases.append((["eval", mla, "--data", "builtin:heldout"], ["multi_latent_attention=True", "(MLA)"]))
    no_tok = _copy(out / "megatron_lm" / "iter_0000010", tmp_path / "no_tok" / "iter_0000010")
    _rewrite_args(no_tok, tokenizer_model=str(tmp_path / "gone"), vocab_size=TINY_VOCAB)
    cases.append((["eval", no_tok, "--data", "builtin:heldout"], ["holds no tokenizer", "eval tokenizes --data"]))
    cases.append((["convert", "--megatron", out / "nemo2", "--iteration", "3", "--out", tmp_path / "c"],
                  ["--iteration 3", "NeMo 2 checkpoint"]))
    cases.append((["export", out / "bridge", "--megatron-out", tmp_path / "m", "--vocab-padding", "7", "--tp", "2"],
                  ["--vocab-padding 7", "multiple of --tp 2"]))
    for argv, words in cases:
        code, err = cli_in_process(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert all(w in err for w in words), (argv, err)
    # a tokenizer is not needed to plan
    code, _ = cli_in_process(capsys, "plan", no_tok, "--target-params", "180K")
    assert code == 0


def test_common_pt_runs_no_code(tmp_path):
    """common.pt loads with torch's weights-only loader, every class or function it names
    replaced by an inert stand-in: a pickled call is recorded, never made; what cannot be
    represented so is refused, still without running anything."""
    import argparse

    from nemo_minitron.checkpoint.dcp_index import load_common
    from nemo_minitron.errors import UsageError

    class Say:
        def __reduce__(self):
            return (print, ("this must not run",))

    marker = tmp_path / "ran"

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))  # pickled as getattr(Path, "touch")(marker)

    torch.save({"args": argparse.Namespace(a=1), "say": Say()}, tmp_path / "common.pt")
    loaded = load_common(tmp_path / "common.pt")
    assert loaded["args"].a == 1
    assert type(loaded["say"]).__name__ == "print" and loaded["say"].args == ("this must not run",)
    torch.save({"touch": Touch()}, tmp_path / "touch.pt")
    with pytest.raises(UsageError, match="unreadable"):
        load_common(tmp_path / "touch.pt")
    assert not marker.exists()


def test_common_state_inside_the_shards_runs_no_code(tmp_path):
    """megatron-core 0.17+ writes no common.pt: the common state (Megatron-LM's args) is an
    object inside the torch_dist shards, which torch's checkpoint reader would unpickle
    unrestricted. Read here from its stored bytes as common.pt is: the args come back, a
    pickled call is recorded, never made; what cannot be represented so is refused, still
    without running anything."""
    import argparse

    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from nemo_minitron.checkpoint.dcp_index import common_state
    from nemo_minitron.errors import UsageError
    from nemo_minitron.files import COMMON_STATE_KEY

    class Writer(FileSystemWriter):
        def storage_meta(self):  # torch's own writer records its path (a PosixPath), megatron's does not
            return None

    def checkpoint(name: str, common: dict) -> Path:
        weights = tmp_path / name
        save({COMMON_STATE_KEY: [common], "decoder.final_norm.weight": torch.ones(4)},
             storage_writer=Writer(str(weights)), planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
        assert not (weights / "common.pt").exists()
        return weights

    marker = tmp_path / "ran"

    class Say:
        def __reduce__(self):
            return (print, ("this must not run",))

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))

    loaded = common_state(checkpoint("say", {"args": argparse.Namespace(num_layers=3), "say": Say()}))
    assert loaded["args"].num_layers == 3
    assert type(loaded["say"]).__name__ == "print" and loaded["say"].args == ("this must not run",)
    with pytest.raises(UsageError, match="unreadable"):
        common_state(checkpoint("touch", {"touch": Touch()}))
    assert not marker.exists()


def test_sharded_loads_read_the_common_state_weights_only(tmp_path, runtime, capfd):
    """Every load of the project (checkpoints, training checkpoints, sparsity masks) goes
    through ``load_sharded``: a call pickled into the common state that megatron-core writes
    (common.pt up to 0.16, an object in the shards from 0.17 on) comes back recorded, never
    made. Without it megatron-core 0.16 refuses the file and 0.17+ runs the call."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from nemo_minitron.checkpoint.dcp_index import load_sharded

    class Say:
        def __reduce__(self):
            return (print, ("this must not run",))

    weights = tmp_path / "weights"
    weights.mkdir()
    stored = torch.arange(6, dtype=torch.float32)
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", stored), "planted": Say()}, str(weights))
    loaded = load_sharded({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(6))}, weights)
    assert torch.equal(loaded["w"], stored)
    assert type(loaded["planted"]).__name__ == "print" and loaded["planted"].args == ("this must not run",)
    assert "this must not run" not in capfd.readouterr().out


# ---------------------------------------------------------------------- ModelOpt's vocabulary
def test_modelopt_axis_names_and_one_indexed_drop_lists():
    from nemo_minitron.errors import UsageError
    from nemo_minitron.prune.targets import parse_drop_layers, parse_target

    assert parse_target("hidden_size=480,ffn_hidden_size=1024,num_attention_heads=6,num_query_groups=3,"
                        "num_layers=24") == {"hidden": 480, "ffn": 1024, "heads": 6, "query_groups": 3, "layers": 24}
    with pytest.raises(UsageError, match="axis 'hidden' given twice"):
        parse_target("hidden=480,hidden_size=480")
    assert parse_drop_layers("17,18,30", 30) == [16, 17, 29]
    assert parse_drop_layers([1], 4) == [0]
    for bad in ("0", "31", "3,3", ",".join(map(str, range(1, 31)))):
        with pytest.raises(UsageError, match="--drop-layers"):
            parse_drop_layers(bad, 30)


def test_recipe_takes_modelopt_names_and_drop_layers(tmp_path):
    from nemo_minitron.pipeline.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: x, iteration: 3}\ndata: {calib: [a], train: [a], heldout: [a]}\n"
                      "rounds: [{prune: {target: {hidden_size: 32}, drop_layers: [1, 2]}}]\n")
    loaded = load_recipe(recipe)
    assert loaded.rounds[0].prune.drop_layers == [1, 2] and loaded.model.iteration == 3


def _kd_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kd.yaml"
    path.write_text(text)
    return path


def test_modelopt_distillation_yaml_maps_to_the_same_losses(tmp_path):
    from nemo_minitron.distill.modelopt_yaml import read_kd_yaml
    from nemo_minitron.errors import UsageError

    s = read_kd_yaml(_kd_yaml(tmp_path, "logit_layers: [output_layer, output_layer]\n"
                                        "intermediate_layer_pairs:\n  - [embedding, embedding, mse]\n"
                                        "  - [decoder.layers.3, decoder.layers.7, mse]\n"
                                        "  - [decoder.final_layernorm, decoder.final_layernorm, mse]\n"
                                        "skip_lm_loss: true\nkd_loss_scale: 3.0\nlogit_kl_temperature: 2.0\n"))
    assert s.as_kwargs() == {"kd_temperature": 2.0, "kd_weight": 1.0, "ce_weight": 0.0, "kd_balance": False,
                             "kd_pairs": ["embedding:embedding", "3:7", "final_norm:final_norm"],
                             "kd_pair_loss": "mse", "kd_pair_weight": "auto"}
    # a Megatron-Bridge override file; the LM loss kept: CE + 3 x KD rescaled to CE
    s = read_kd_yaml(_kd_yaml(tmp_path, "model:\n  kd_config:\n    skip_lm_loss: false\n    kd_loss_scale: 3.0\n"))
    assert (s.kd_weight, s.ce_weight, s.kd_balance, s.kd_pairs) == (3.0, 1.0, True, ())
    for text, words in (("logit_layers: [decoder.final_layernorm, output_layer]\n", "logit_layers"),
                        ("logit_kl_topk: 100\n", "logit_kl_topk"), ("temperature: 2\n", "unknown key 'temperature'"),
                        ("intermediate_layer_pairs: [[decoder.layers.3.mlp, decoder.layers.3]]\n", "decoder.layers.3.mlp"),
                        ("intermediate_layer_pairs: [[embedding, embedding, cosine], [embedding, embedding, mse]]\n",
                         "mix cosine and mse")):
        with pytest.raises(UsageError, match=words.replace("[", r"\[").replace(".", r"\.")):
            read_kd_yaml(_kd_yaml(tmp_path, text))


def test_distill_config_flag_conflicts_are_one_line(tiny_checkpoint, tmp_path, capsys):
    kd = _kd_yaml(tmp_path, "skip_lm_loss: true\n")
    teacher, student = tiny_checkpoint("llama"), tiny_checkpoint("llama_small")
    code, err = cli_in_process(capsys, "distill", "--teacher", teacher, "--student", student, "--data",
                               "builtin:train", "--out", tmp_path / "o", "--steps", "1", "--config", kd,
                               "--kd-temperature", "3")
    assert code == 2 and "--config sets the distillation losses; drop --kd-temperature" in err
    assert not (tmp_path / "o").exists()


def test_balanced_logit_loss_is_modelopts_balancer():
    """balance=True: CE + s * KD * (CE / KD), the ratio constant in backward (ModelOpt 0.47's
    LogitsAndIntermediatesLossBalancer with skip_lm_loss false), written out with autograd."""
    import torch.nn.functional as F

    from nemo_minitron.distill.losses import LogitLossConfig, logit_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64).float().requires_grad_()
    y = torch.randn(6, 40, generator=g)
    labels = torch.randint(0, 40, (6,), generator=g)
    T, s = 2.0, 3.0
    cfg = LogitLossConfig(temperature=T, kind="forward", top_k=None, kd_weight=s, ce_weight=1.0, chunk_tokens=4,
                          vocab_size=None, balance=True)
    total, *_ = logit_loss(z, y, labels, cfg)
    total.backward()
    z2 = z.detach().clone().requires_grad_()
    kd = (T * T * F.kl_div(F.log_softmax(z2 / T, -1), F.log_softmax(y / T, -1), log_target=True,
                           reduction="none").sum(-1)).mean()
    ce = F.cross_entropy(z2, labels)
    ref = ce + s * kd * (ce.detach() / kd.detach())
    ref.backward()
    # float32 over 40-wide softmaxes: agreement to ~1e-6 relative
    assert abs(total.item() - ref.item()) <= 1e-5 * ref.item()
    assert (z.grad - z2.grad).abs().max().item() <= 1e-5 * z2.grad.abs().max().item()


# ---------------------------------------------------------------------- the real model
@pytest.mark.smollm2
def test_smollm2_round_trip_through_megatron_lm_keeps_the_logits(smollm2, tmp_path):
    """SmolLM2-135M: Hugging Face -> ours -> Megatron-LM checkpoint -> ours -> Hugging Face."""
    from nemo_minitron.checkpoint.api import convert, export
    from nemo_minitron.runtime.distributed import init_distributed

    export(str(smollm2["checkpoint"]), megatron_out=str(tmp_path / "megatron"))
    back = convert(str(tmp_path / "megatron"), str(tmp_path / "ours"))
    export(str(back), str(tmp_path / "hf"))
    init_distributed(1, 1)
    logits = hf_logits(tmp_path / "hf", smollm2["tokens"])
    # the weights are copied in float32 all the way: the same HF computation on the same weights
    assert _diff(logits, smollm2["logits"]) <= LOGITS_TOL
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] is not None
