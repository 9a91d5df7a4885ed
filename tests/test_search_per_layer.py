"""``search --per-layer``: per-layer candidates beside the uniform ones (each the exact
optimum of its constraints, written out here by enumeration), a short search over both on
a tiny model ranked by the held-out losses its candidates logged, and the one-line refusals."""

from __future__ import annotations

import functools
import itertools
import json

import pytest
import torch

from conftest import cli_in_process
from test_per_layer import _model_flops

PARENT = "llama_wide_mlp"            # 4 layers, 4 K/V groups, MLP 768: widths the export states
GROUPS, WIDTHS = (4, 2, 1, 0), (768, 512, 256, 0)
BUDGET = "620K"  # of 784K: three MLP steps down (49K each) and one attention removed (16K) just meet it
STEPS = 2
TINY = dict(target_params=BUDGET, per_layer=True, candidates=1, per_layer_candidates=2, steps=STEPS, global_batch=4,
            micro_batch=2, seq_len=16, lr=1e-3, warmup_steps=0, eval_every=STEPS, eval_samples=4, cache_top_k=16,
            seed=3, layer_metric="loss", keep_all=True, dtype="float32")


def _block_scores(desc, directory, seed: int = 7) -> None:
    """Synthetic importance of ``desc`` with block-variant tables: the parent's option 0, a
    smaller option a larger score, except removing layer 3's attention, nearly free (so the
    optimum removes it and the search adds the optimum keeping every attention), and
    layer 0's attention with one K/V group, below two (the optimum at TP=1 takes it)."""
    from test_prune import synthetic_scores

    from nemo_minitron.importance.scores import ImportanceScores

    synthetic_scores(desc, directory, seed=seed)
    scores = ImportanceScores.load(directory)
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for kind, options in (("attention", GROUPS), ("ffn", WIDTHS)):
        steps = torch.rand(desc.num_layers, len(options), generator=g)
        steps[:, 0] = 0
        tables[kind] = steps.cumsum(1)  # each smaller option costs more score than the one before
    tables["attention"][3, -1] = 1e-3  # cheaper than a fourth MLP step
    tables["attention"][0, 2] = 0.9 * tables["attention"][0, 1]  # one group below two: not at --tp 2
    for metric in ("kl", "loss"):
        scores.tensors.update({f"block_attention_{metric}": tables["attention"].clone(),
                               f"block_ffn_{metric}": tables["ffn"].clone()})
    scores.summary["block_variants"] = {"query_groups": list(GROUPS), "ffn": list(WIDTHS)}
    scores.save(directory)


@pytest.fixture(scope="module")
def block_importance(tiny_checkpoint, tmp_path_factory):
    from nemo_minitron.checkpoint.store import read_info

    directory = tmp_path_factory.mktemp("search_per_layer") / "imp"
    directory.mkdir()
    _block_scores(read_info(tiny_checkpoint(PARENT)).description, directory)
    return directory


def _memory(desc, context: int, batch: int) -> int:
    """Weights and KV cache in bf16, from the description's own counts."""
    return desc.num_parameters() * 2 + desc.kv_cache_bytes_per_token(2) * context * batch


def _ranked_choices(desc, attention, ffn, fits, tp: int = 1) -> list[tuple[float, tuple, tuple]]:
    """Every per-layer architecture written out: (summed score, groups, widths) of those that
    keep some attention, split over ``tp`` and ``fits`` the budget, least score first."""
    from nemo_minitron.model.description import LayerShape

    @functools.cache
    def fit(shapes: tuple) -> bool:  # the count does not depend on the layers' order
        return fits(desc.replace(layer_shapes=[LayerShape(*s) for s in shapes]))

    L, attention, ffn = desc.num_layers, attention.tolist(), ffn.tolist()
    out = []
    for a in itertools.product(range(len(GROUPS)), repeat=L):
        if all(GROUPS[i] == 0 for i in a) or any(GROUPS[i] % tp for i in a):
            continue
        for f in itertools.product(range(len(WIDTHS)), repeat=L):
            if fit(tuple(sorted((GROUPS[i], WIDTHS[j]) for i, j in zip(a, f)))):
                out.append((sum(attention[l][i] + ffn[l][j] for l, (i, j) in enumerate(zip(a, f))),
                            tuple(GROUPS[i] for i in a), tuple(WIDTHS[j] for j in f)))
    return sorted(out)


def _blocks_apart(x, y) -> int:
    return sum(p != q for p, q in zip(x[1] + x[2], y[1] + y[2]))


@pytest.mark.parametrize("budget, tp", [({"target_params": BUDGET}, 1), ({"target_params": BUDGET}, 2),
                                        ({"target_memory": "1.6MB", "memory_context": 256}, 1),
                                        ({"target_flops": "1.25M", "flops_context": 256}, 1)])
def test_per_layer_candidates_are_the_solvers_optima_and_differ(tiny_checkpoint, block_importance, budget, tp):
    """Beside the planner's uniform shapes: the optimum, the optimum keeping every attention
    (the optimum removes one), then the best at least one block away from both, each equal to
    the enumerated optimum of its constraints, within the budget, distinct, split over TP."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.config import build, cli_names
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.prune.targets import parse_bytes, parse_param_count
    from nemo_minitron.search.candidates import search_candidates
    from nemo_minitron.search.config import SearchConfig

    desc = read_info(tiny_checkpoint(PARENT)).description
    scores = ImportanceScores.load(block_importance)
    cfg = build(SearchConfig, per_layer=True, candidates=2, per_layer_candidates=3, layer_metric="loss", **budget)
    picked = search_candidates(desc, cfg, tp=tp, names=cli_names(SearchConfig), scores=scores)
    if "target_memory" in budget:
        limit = parse_bytes(budget["target_memory"])
        cost = lambda d: _memory(d, 256, 1)  # noqa: E731
    elif "target_flops" in budget:  # counted from the matrices' shapes
        limit, cost = 1_250_000, lambda d: _model_flops(d, 256)  # noqa: E731
    else:
        limit, cost = parse_param_count(BUDGET), lambda d: d.num_parameters()  # noqa: E731
    uniform = [c for c in picked if not c.description.layer_shapes and c.kind != "mlp-only"]
    per_layer = [c for c in picked if c.description.layer_shapes]
    assert [c.name for c in picked] == [f"c{i}" for i in range(1, len(picked) + 1)]
    assert 1 <= len(uniform) <= 2 and [c.kind for c in per_layer] == ["per-layer"] * 3
    for c in uniform:  # the planner's rule: within the tolerance of the budget
        assert c.kind in ("width", "depth", "mixed") and abs(cost(c.description) / limit - 1) <= cfg.tolerance
    # the uniform MLP-only shape: the parent's hidden size, attention and layers, the widest MLP on
    # the planner's grid (64, and the TP size) whose cost is within the budget
    mlp_only = [c for c in picked if c.kind == "mlp-only"]
    assert len(mlp_only) == 1 and mlp_only[0] == picked[len(uniform)] and mlp_only[0].target() is not None
    d = mlp_only[0].description
    assert (d.hidden_size, d.num_attention_heads, d.num_query_groups, d.num_layers, d.layer_shapes) == \
        (desc.hidden_size, desc.num_attention_heads, desc.num_query_groups, desc.num_layers, ())
    fitting = [w for w in range(64, desc.ffn_hidden_size, 64) if cost(desc.replace(ffn_hidden_size=w)) <= limit]
    assert d.ffn_hidden_size == max(fitting) and d.check_layout(tp, 1) is None
    ranked = _ranked_choices(desc, scores["block_attention_kl"], scores["block_ffn_kl"],
                             lambda d: cost(d) <= limit, tp)
    got = [(c.choice.score, tuple(s.num_query_groups for s in c.description.layer_shapes),
            tuple(s.ffn_hidden_size for s in c.description.layer_shapes)) for c in per_layer]
    optimum, kept, apart = got
    assert optimum[1:] == ranked[0][1:] and 0 in optimum[1]
    assert kept[1:] == next(r for r in ranked if 0 not in r[1])[1:]
    assert apart[1:] == next(r for r in ranked if _blocks_apart(r, optimum) and _blocks_apart(r, kept))[1:]
    for c, row in zip(per_layer, got):
        assert cost(c.description) <= limit and c.description.check_layout(tp, 1) is None
        assert c.choice.score == pytest.approx(row[0]) and c.target() is None
    assert len({g[1:] for g in got}) == 3
    if tp == 2:  # one K/V group does not split over 2 ranks (at TP=1 the optimum has one)
        assert all(1 not in g[1] for g in got)
    elif "target_params" in budget:
        assert 1 in optimum[1]


@pytest.fixture(scope="module")
def per_layer_search(tiny_checkpoint, block_importance, tmp_path_factory, runtime):
    from nemo_minitron.search.api import search

    out = tmp_path_factory.mktemp("per_layer_search") / "search"
    result = search(str(tiny_checkpoint(PARENT)), str(block_importance), ["builtin:train"], str(out), progress=False,
                    **TINY)
    return {"out": out, "result": result, "rows": {r["name"]: r for r in result["candidates"]}}


def _final_heldout(directory) -> float:
    """The held-out loss the candidate's distillation logged at its last step."""
    records = [json.loads(line) for line in (directory / "distill" / "metrics.jsonl").read_text().splitlines()]
    return next(r["heldout_loss"] for r in reversed(records) if r.get("kind") == "eval" and r["step"] == STEPS)


def test_search_over_uniform_and_per_layer_keeps_the_lowest_heldout_loss(per_layer_search):
    """One uniform and two per-layer candidates, distilled alike: the winner is the one whose
    own metrics log the lowest held-out loss at the last step; search.json says each one's
    kind, parameters and (per-layer) widths per layer."""
    out, result, rows = per_layer_search["out"], per_layer_search["result"], per_layer_search["rows"]
    assert [r["kind"] for r in rows.values()] == ["width", "mlp-only", "per-layer", "per-layer"]
    assert [r["uniform"] for r in rows.values()] == [True, True, False, False]
    logged = {name: _final_heldout(out / r["directory"]) for name, r in rows.items()}
    assert result["best"] == min(logged, key=logged.get), logged
    assert json.loads((out / "search.json").read_text())["best"] == result["best"]
    for r in rows.values():
        assert r["final_loss"] == logged[r["name"]] and r["params"] <= 620_000 * (1 + 0.05 * r["uniform"])
        assert (r["layer_shapes"] is None) == r["uniform"] and (r["target"] is None) != r["uniform"]
    assert (out / "search.png").is_file() and (out / "search-layers.png").is_file()


def test_each_candidate_checkpoint_has_its_shape_and_the_winner_is_in_best(per_layer_search):
    """Every pruned checkpoint is the architecture its row names (a per-layer one: the K/V
    groups and MLP width of each layer), and best/ holds the winner's, per layer when a
    per-layer candidate won."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.model.description import ModelDescription

    out, result, rows = per_layer_search["out"], per_layer_search["result"], per_layer_search["rows"]
    for r in rows.values():
        desc = read_info(out / r["directory"] / "pruned").description
        assert desc == ModelDescription.from_dict(r["architecture"]) and desc.num_parameters() == r["params"]
        assert [[s.num_query_groups, s.ffn_hidden_size] for s in desc.layer_shapes] == (r["layer_shapes"] or [])
    best = rows[result["best"]]
    assert best["directory"] == "best"
    shapes = read_info(out / "best" / "pruned").description.layer_shapes
    assert [[s.num_query_groups, s.ffn_hidden_size] for s in shapes] == (best["layer_shapes"] or [])
    assert len({json.dumps(r["layer_shapes"]) for r in rows.values()}) == 3


def test_the_mlp_only_candidate_is_pruned_to_the_planners_count(per_layer_search, tiny_checkpoint):
    """The uniform MLP-only candidate's pruned checkpoint holds as many parameters as the planner
    counted for it (its tensors counted one by one), within the budget, with the parent's
    hidden size, heads, K/V groups and layers."""
    from nemo_minitron.checkpoint.store import load_checkpoint, read_info
    from nemo_minitron.model.params import named_weights
    from nemo_minitron.prune.plan import mlp_only
    from nemo_minitron.prune.targets import parse_param_count

    parent = read_info(tiny_checkpoint(PARENT)).description
    row = next(r for r in per_layer_search["rows"].values() if r["kind"] == "mlp-only")
    model, info = load_checkpoint(str(per_layer_search["out"] / row["directory"] / "pruned"), dtype=torch.float32)
    d = info.description
    held = sum(d.vocab_size * p.shape[1] if name in ("embedding.word_embeddings.weight", "output_layer.weight")
               else p.numel() for name, p in named_weights(model))  # megatron pads the vocabulary
    planned = mlp_only(parent, parse_param_count(BUDGET)).params
    assert held == planned == row["params"] <= parse_param_count(BUDGET)
    assert (d.hidden_size, d.num_attention_heads, d.num_query_groups, d.num_layers) == \
        (parent.hidden_size, parent.num_attention_heads, parent.num_query_groups, parent.num_layers)
    assert d.ffn_hidden_size < parent.ffn_hidden_size


def test_the_ranking_shows_kinds_and_widths_per_layer(per_layer_search):
    from nemo_minitron.search.api import format_ranking

    table = format_ranking(per_layer_search["result"]).splitlines()
    for r in per_layer_search["rows"].values():
        line = next(line for line in table[2:] if line.split()[1] == r["name"])
        assert r["kind"] in line
        if r["layer_shapes"]:
            groups, ffn = zip(*r["layer_shapes"])
            assert f"query groups {','.join(map(str, groups))}; ffn {','.join(map(str, ffn))}" in line


@pytest.mark.parametrize("flags, says", [
    (["--per-layer", "--target-params", BUDGET, "--importance", "PLAIN"],
     "--per-layer: --importance holds no block-variant scores; rerun importance with --block-variants"),
    (["--per-layer", "--target-params", "100K"], "--target-params 100K: no per-layer architecture meets it"),
    (["--per-layer", "--target-memory", "100KB"], "--target-memory 0.1 MiB: no per-layer architecture meets it"),
    (["--per-layer", "--target-params", BUDGET, "--target-memory", "1MB"], "--per-layer needs exactly one budget"),
    (["--target-memory", "1MB"], "--target-memory is a --per-layer budget; add --per-layer"),
    # the output layer (2 x 64 x 1000) and one attention of one K/V group: 20,480 in its projections,
    # 2 x 2 x 64 x 2,048 over the 4,096-token context's 2,048 keys on average
    (["--per-layer", "--target-flops", "100K"], "--target-flops 100K: no per-layer architecture meets it; the smallest "
                                                "the scored variants allow is 672.8K FLOPs per token (forward, at "
                                                "context 4096)"),
    (["--per-layer", "--target-flops", "1G", "--target-memory", "1MB"], "--per-layer needs exactly one budget"),
    (["--candidates", "2"], "--target-params is required"),
    (["--per-layer", "--target-params", BUDGET, "--refit"], "--refit: '"),  # no second moments
])
def test_bad_input(tiny_checkpoint, block_importance, tmp_path, capsys, flags, says):
    """No block-variant scores, a budget no architecture meets, and budget flags misused:
    one line, exit 2, nothing written."""
    from test_prune import synthetic_scores

    from nemo_minitron.checkpoint.store import read_info

    plain = tmp_path / "plain"
    plain.mkdir()
    synthetic_scores(read_info(tiny_checkpoint(PARENT)).description, plain, seed=4)
    if "--importance" not in flags:
        flags = [*flags, "--importance", block_importance]
    flags = [plain if f == "PLAIN" else f for f in flags]
    out = tmp_path / "out"
    code, err = cli_in_process(capsys, "search", tiny_checkpoint(PARENT), "--data", "builtin:train", "--out", out,
                               "--layer-metric", "loss", *flags)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("overrides, says", [
    (["rounds.0.importance.block_variants=false"], "'rounds.0.search.per_layer' chooses from block-variant scores"),
    (["rounds.0.search.target_memory=1MB"], "'rounds.0.search.per_layer' needs exactly one budget"),
    (["rounds.0.search.target_flops=1G"], "'rounds.0.search.per_layer' needs exactly one budget"),
    (["rounds=[{importance: {block_variants: true}, search: {per_layer: true, target_params: 600K}}, "
      "{prune: {target_params: 300K}}]"], "a per-layer model is not pruned again"),
    (["rounds.0.search.refit=true"], "'rounds.0.search.refit' solves with the second moments"),
    (["rounds.0.search.refit=true", "rounds.0.importance.second_moments=true",
      "rounds.0.importance.block_distill_steps=2", "rounds.0.importance.block_distill_samples=1"],
     "'rounds.0.search.per_layer': 'rounds.0.importance.block_distill_steps' trains the variants"),
    ([], None),
])
def test_per_layer_search_recipe_keys(overrides, says):
    """``rounds.N.search.per_layer`` takes prune's per-layer rules: block-variant scores, one
    budget, the last round; errors name the key."""
    from conftest import TESTS
    from nemo_minitron.errors import UsageError
    from nemo_minitron.pipeline.recipe import load_recipe

    search = ["rounds.0.prune.per_layer=false", "rounds.0.prune.target_params=null",
              f"rounds.0.search={{per_layer: true, target_params: {BUDGET}, per_layer_candidates: 2}}"]
    path = TESTS / "recipes" / "tiny_per_layer.yaml"
    if says is None:
        rnd = load_recipe(path, ["model.source=m", "output_dir=o", *search]).rounds[0]
        assert rnd.search.per_layer and rnd.search.per_layer_candidates == 2 and not rnd.prune.per_layer
        return
    with pytest.raises(UsageError) as e:
        load_recipe(path, ["model.source=m", "output_dir=o", *search, *overrides])
    assert says in str(e.value)
