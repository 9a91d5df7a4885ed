"""Per-layer (Puzzle-style) architectures: block-variant scores against a resized
transformers reference, the exact choice under a budget against brute-force enumeration,
the pruned per-layer checkpoint's weights and counts, and the one-line refusals."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from conftest import cli_in_process
from tiny_models import _Removed
from tolerances import fp32, log_softmax_sum, transformer_logits

SEQ, SAMPLES, BLOCK_SAMPLES, SEED = 24, 4, 3, 5
FFN_MULTIPLE, FFN_VARIANTS = 32, 2   # the tiny llama's MLP (96): widths 64 and 32


def _tiny_desc(**changes):
    from nemo_minitron.model.description import ModelDescription

    base = dict(architecture="llama", vocab_size=1000, hidden_size=64, ffn_hidden_size=96, num_layers=4,
                num_attention_heads=4, num_query_groups=2, head_dim=16)
    return ModelDescription(**{**base, **changes})


# ---------------------------------------------------------------------- the solver
def _enumerate(desc, variants, attention, ffn, budget, tp=1):
    """Every per-layer choice, written out: (score, attention options, MLP options) of the best
    one within the budget that keeps some attention."""
    from nemo_minitron.prune.variants import LayerShape, fixed_parameters, layer_kv_bytes_per_token, layer_parameters

    def cost(groups, width):
        params = layer_parameters(desc, LayerShape(groups, width))
        if budget.kind != "memory":
            return params
        return params * budget.bytes_per_value + layer_kv_bytes_per_token(desc, LayerShape(groups, width),
                                                                          budget.bytes_per_value) \
            * budget.context * budget.batch
    fixed = fixed_parameters(desc) * (budget.bytes_per_value if budget.kind == "memory" else 1)
    return _best(desc, variants, attention, ffn, lambda shapes: fixed + sum(cost(*s) for s in shapes) <= budget.limit,
                 tp)


def _best(desc, variants, attention, ffn, fits, tp=1):
    """(score, attention options, MLP options) of the best choice whose (groups, width) per
    layer ``fits``, that keeps some attention and splits over ``tp``, every one written out."""
    A = [a for a, g in enumerate(variants.query_groups) if g % tp == 0]
    F = [f for f, w in enumerate(variants.ffn) if w % tp == 0]
    best = None
    for picks_a in itertools.product(A, repeat=desc.num_layers):
        if all(variants.query_groups[a] == 0 for a in picks_a):
            continue
        for picks_f in itertools.product(F, repeat=desc.num_layers):
            if not fits([(variants.query_groups[a], variants.ffn[f]) for a, f in zip(picks_a, picks_f)]):
                continue
            score = sum(float(attention[l, a]) + float(ffn[l, f]) for l, (a, f) in enumerate(zip(picks_a, picks_f)))
            if best is None or score < best[0]:
                best = (score, picks_a, picks_f)
    return best


def test_choice_equals_brute_force():
    """scipy's integer program picks exactly the enumerated optimum, for parameter and memory
    budgets, with attention removal scored as a gain (the solver must still keep one)."""
    from nemo_minitron.prune.per_layer import Budget, choose
    from nemo_minitron.prune.variants import block_variants

    desc = _tiny_desc(num_layers=3)
    variants = block_variants(desc, FFN_VARIANTS, FFN_MULTIPLE)
    assert variants.query_groups == (2, 1, 0) and variants.ffn == (96, 64, 32, 0)
    g = torch.Generator().manual_seed(0)
    full = desc.num_parameters()
    cases = 0
    for trial in range(4):
        attention = torch.rand(desc.num_layers, 3, generator=g)
        ffn = torch.rand(desc.num_layers, 4, generator=g)
        attention[:, 0] = ffn[:, 0] = 0
        if trial == 3:  # removing attention looks free: the unconstrained optimum has none
            attention[:, -1] = -1.0 - attention[:, -1]  # distinct: one optimum
        for budget in (Budget("params", int(0.97 * full)), Budget("active_params", int(0.93 * full)),
                       Budget("memory", int(0.95 * (full * 2 + 3 * 2 * 2 * 16 * 2 * 64)), "--target-memory",
                              context=64, batch=2)):
            expected = _enumerate(desc, variants, attention, ffn, budget)
            choice = choose(desc, variants, attention, ffn, budget)
            assert (choice.attention_option, choice.ffn_option) == (expected[1], expected[2]), (trial, budget)
            assert choice.score == pytest.approx(expected[0], abs=1e-9)
            assert choice.cost <= budget.limit
            cases += 1
    assert cases == 12


def test_choice_at_tp2_leaves_out_what_tp_cannot_split():
    from nemo_minitron.prune.per_layer import Budget, choose
    from nemo_minitron.prune.variants import BlockVariants

    desc = _tiny_desc()
    variants = BlockVariants((2, 1, 0), (96, 48, 33, 0))  # 1 group and 33 neurons do not split over 2 ranks
    g = torch.Generator().manual_seed(1)
    attention, ffn = torch.rand(4, 3, generator=g), torch.rand(4, 4, generator=g)
    attention[:, 0] = ffn[:, 0] = 0
    budget = Budget("params", int(0.9 * desc.num_parameters()))
    choice = choose(desc, variants, attention, ffn, budget, tp=2)
    expected = _enumerate(desc, variants, attention, ffn, budget, tp=2)
    assert (choice.attention_option, choice.ffn_option) == (expected[1], expected[2])
    assert all(s.num_query_groups != 1 and s.ffn_hidden_size != 33 for s in choice.shapes)


# ---------------------------------------------------------------------- a FLOPs budget
def written_out_flops(desc, shapes, context: int) -> int:
    """Forward FLOPs per token of a (gated-MLP, bias-free) model whose layers have ``shapes``
    ((K/V groups, MLP width), 0: removed), from its matrices: 2 per multiply-add of every
    product, and attention over a causal context of ``context`` tokens (on average context / 2
    keys per query, as the project counts it)."""
    assert desc.activation == "swiglu" and not desc.qkv_bias and context % 2 == 0
    h, d, heads = desc.hidden_size, desc.head_dim, desc.num_attention_heads
    flops = 2 * h * desc.vocab_size  # the output layer: hidden -> logits (the embedding is a lookup)
    for groups, width in shapes:
        if groups:
            flops += 2 * h * heads * d          # query projection
            flops += 2 * 2 * h * groups * d     # key and value projections
            flops += 2 * heads * d * h          # output projection
            flops += 2 * heads * 2 * d * (context // 2)  # per head: q.k and the weighted sum of v, per key
        if width:
            flops += 2 * 3 * h * width          # gate and up (hidden -> width), down (width -> hidden)
    return flops


def _model_flops(desc, context: int) -> int:
    """``written_out_flops`` of a uniform or per-layer description."""
    shapes = [(s.num_query_groups, s.ffn_hidden_size) for s in desc.layer_shapes] or \
        [(desc.num_query_groups, desc.ffn_hidden_size)] * desc.num_layers
    return written_out_flops(desc, shapes, context)


def test_choice_under_a_flops_budget_equals_brute_force():
    """Under a FLOPs budget, at a short context (the MLPs cost most) and a long one (attention
    does), the integer program picks the enumerated optimum, and its reported cost is the
    chosen model's FLOPs counted from its matrices (also what the description counts)."""
    from nemo_minitron.prune.per_layer import Budget, choose
    from nemo_minitron.prune.variants import block_variants

    desc = _tiny_desc(num_layers=3)
    variants = block_variants(desc, FFN_VARIANTS, FFN_MULTIPLE)
    assert variants.query_groups == (2, 1, 0) and variants.ffn == (96, 64, 32, 0)
    g = torch.Generator().manual_seed(2)
    picked = set()
    for trial in range(3):
        attention = torch.rand(desc.num_layers, 3, generator=g)
        ffn = torch.rand(desc.num_layers, 4, generator=g)
        attention[:, 0] = ffn[:, 0] = 0
        if trial == 2:  # removing attention looks free: the unconstrained optimum has none
            attention[:, -1] = -1.0 - attention[:, -1]
        for context in (64, 4096):
            full = _model_flops(desc, context)
            assert Budget("flops", full, context=context).total(desc) == full
            for fraction in (0.55, 0.85):
                limit = int(fraction * full)
                # every choice written out, each counted from its matrices
                expected = _best(desc, variants, attention, ffn,
                                 lambda shapes: written_out_flops(desc, shapes, context) <= limit)
                choice = choose(desc, variants, attention, ffn, Budget("flops", limit, "--target-flops", context=context))
                assert (choice.attention_option, choice.ffn_option) == expected[1:], (trial, context, fraction)
                assert choice.score == pytest.approx(expected[0], abs=1e-9)
                shapes = [(s.num_query_groups, s.ffn_hidden_size) for s in choice.shapes]
                assert choice.cost == written_out_flops(desc, shapes, context) <= limit
                assert desc.replace(layer_shapes=choice.shapes).flops_per_token(context) == choice.cost
                picked.add(tuple(shapes))
    assert len(picked) >= 6  # the budgets and contexts bind differently


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "nemotron"])
def test_layer_costs_add_up_to_the_model(tiny_hf, kind):
    """The per-layer cost of the parent's own shape, summed over layers, is the model's
    parameter count as transformers reports it (biases, QK-norms, LayerNorm biases)."""
    import transformers

    from nemo_minitron.checkpoint.hf_format import description_from_hf_config
    from nemo_minitron.prune.variants import LayerShape, fixed_parameters, layer_parameters

    config = json.loads((tiny_hf(kind) / "config.json").read_text())
    desc = description_from_hf_config(config)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tiny_hf(kind)))
    parent = LayerShape(desc.num_query_groups, desc.ffn_hidden_size)
    assert fixed_parameters(desc) + desc.num_layers * layer_parameters(desc, parent) == hf.num_parameters()


# ---------------------------------------------------------------------- the scores
@pytest.fixture(scope="module")
def scored(tiny_checkpoint, tmp_path_factory):
    """An importance directory of the tiny llama with block-variant scores."""
    from nemo_minitron.importance.api import compute_importance

    out = tmp_path_factory.mktemp("per_layer") / "imp"
    compute_importance(str(tiny_checkpoint("llama")), ["builtin:calib"], str(out), samples=SAMPLES, seq_len=SEQ,
                       layer_samples=1, block_variants=True, ffn_variants=FFN_VARIANTS, ffn_multiple=FFN_MULTIPLE,
                       block_samples=BLOCK_SAMPLES, seed=SEED, dtype="float32", progress=False)
    return out


def _resized_mlp(hf, layer, neurons):
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = copy.deepcopy(hf.config)
    cfg.intermediate_size = len(neurons)
    old, new = hf.model.layers[layer].mlp, LlamaMLP(cfg)
    with torch.no_grad():
        new.gate_proj.weight.copy_(old.gate_proj.weight[neurons])
        new.up_proj.weight.copy_(old.up_proj.weight[neurons])
        new.down_proj.weight.copy_(old.down_proj.weight[:, neurons])
    return new


def _resized_attention(hf, layer, group_scores, groups):
    """An attention of ``groups`` K/V groups: the parent's groups ranked by score, merged in
    runs of consecutive rank (K/V the mean of the run's), query heads regrouped to match."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = copy.deepcopy(hf.config)
    G, H, d = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    hpg, size = H // G, G // groups
    ranked = sorted(range(G), key=lambda j: (-float(group_scores[j]), j))
    runs = sorted(sorted(ranked[k * size:(k + 1) * size]) for k in range(groups))
    cfg.num_key_value_heads = groups
    old, new = hf.model.layers[layer].self_attn, LlamaAttention(cfg, layer)
    heads = [j * hpg + i for run in runs for j in run for i in range(hpg)]
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    with torch.no_grad():
        new.q_proj.weight.copy_(old.q_proj.weight[rows])
        new.o_proj.weight.copy_(old.o_proj.weight[:, rows])
        for name in ("k_proj", "v_proj"):
            w = getattr(old, name).weight.view(G, d, -1)
            getattr(new, name).weight.copy_(torch.cat([w[run].mean(0) for run in runs]))
    return new


def _loss_and_logp(hf, samples, vocab):
    with torch.no_grad():
        logits = hf(samples[:, :-1]).logits.float()[..., :vocab]
    logp = torch.log_softmax(logits, -1)
    loss = -logp.gather(-1, samples[:, 1:, None]).mean()
    return loss.item(), logp, logits


def test_scores_equal_resized_reference(scored, tiny_hf, tiny_checkpoint):
    """Each stored score (loss change, KL from the parent) equals the one of transformers' model
    with that layer's block swapped for a resized module (or removed)."""
    import transformers

    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples
    from nemo_minitron.importance.scores import ImportanceScores

    scores = ImportanceScores.load(scored)
    recorded = scores.summary["block_variants"]
    assert recorded["query_groups"] == [2, 1, 0] and recorded["ffn"] == [96, 64, 32, 0]
    checkpoint = tiny_checkpoint("llama")
    desc = read_info(checkpoint).description
    corpus = check_corpus(["builtin:calib"], vocab_size=desc.vocab_size)
    samples = calibration_samples(corpus, load_tokenizer(checkpoint), seq_len=SEQ, samples=SAMPLES,
                                  seed=SEED)[:BLOCK_SAMPLES]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf("llama"), dtype=torch.float32).eval()
    parent_loss, parent_logp, logits = _loss_and_logp(hf, samples, desc.vocab_size)
    tol = 2 * (transformer_logits(desc.hidden_size * 4, desc.num_layers, logits)
               + log_softmax_sum(desc.vocab_size, logits.abs().max().item()))
    for layer in range(desc.num_layers):
        for kind, options in (("attention", recorded["query_groups"]), ("ffn", recorded["ffn"])):
            for j, size in enumerate(options):
                model = copy.deepcopy(hf)
                block = model.model.layers[layer]
                if kind == "ffn" and size == 0:
                    block.mlp = _Removed(attention=False)
                elif kind == "ffn":
                    neurons = torch.argsort(scores["ffn"][layer], descending=True, stable=True)[:size].sort().values
                    block.mlp = _resized_mlp(hf, layer, neurons)
                elif size == 0:
                    block.self_attn = _Removed(attention=True)
                else:
                    block.self_attn = _resized_attention(hf, layer, scores["query_groups"][layer], size)
                loss, logp, _ = _loss_and_logp(model, samples, desc.vocab_size)
                kl = (parent_logp.exp() * (parent_logp - logp)).sum(-1).mean().item()
                assert scores[f"block_{kind}_loss"][layer, j].item() == pytest.approx(loss - parent_loss, abs=tol), \
                    (kind, layer, size)
                assert scores[f"block_{kind}_kl"][layer, j].item() == pytest.approx(kl, abs=tol), (kind, layer, size)
    # removing a block costs something somewhere: the scores are not all zero
    assert scores["block_ffn_kl"][:, -1].min() > 0 and scores["block_attention_kl"][:, -1].min() > 0


# ---------------------------------------------------------------------- plan --per-layer and refusals
# The tiny llama: fixed 2 x 1000 x 64 + 64 = 128,064 parameters outside the layers; an attention
# of g groups 8,256 + 2,048 g (its norm included); the cheapest model with attention keeps one
# attention of 1 group (10,304) at --tp 1, of 2 groups (12,352) at --tp 2.
CHEAPEST_TP1, CHEAPEST_TP2, OUTSIDE_LAYERS = 128_064 + 10_304, 128_064 + 12_352, 128_064


def test_plan_per_layer_prints_the_choice(scored, tiny_checkpoint, tmp_path, capsys):
    from nemo_minitron.importance.scores import ImportanceScores

    from nemo_minitron.checkpoint.store import read_info

    scores = ImportanceScores.load(scored)
    desc = read_info(tiny_checkpoint("llama")).description
    budget = int(0.8 * desc.num_parameters())
    out = tmp_path / "choice.json"
    code, err = cli_in_process(capsys, "plan", tiny_checkpoint("llama"), "--per-layer", "--importance", scored,
                               "--target-params", str(budget), "--json", out)
    assert code == 0, err
    choice = json.loads(out.read_text())
    shapes = choice["layer_shapes"]
    assert len(shapes) == desc.num_layers and any(g for g, _ in shapes)
    new = desc.replace(layer_shapes=shapes)
    assert choice["params"] == new.num_parameters() <= budget
    variants = scores.summary["block_variants"]
    expected = sum(scores["block_attention_kl"][l, variants["query_groups"].index(g)].item()
                   + scores["block_ffn_kl"][l, variants["ffn"].index(f)].item() for l, (g, f) in enumerate(shapes))
    assert choice["score"] == pytest.approx(expected, rel=1e-6)
    # a memory budget: weights (2 bytes each) plus the KV cache of 2 sequences of 64 tokens
    parent_bytes = desc.num_parameters() * 2 + desc.kv_cache_bytes_per_token() * 64 * 2
    code, err = cli_in_process(capsys, "plan", tiny_checkpoint("llama"), "--per-layer", "--importance", scored,
                               "--target-memory", str(int(0.8 * parent_bytes)), "--memory-context", "64",
                               "--memory-batch", "2", "--json", tmp_path / "memory.json")
    assert code == 0, err
    memory = json.loads((tmp_path / "memory.json").read_text())
    new = desc.replace(layer_shapes=memory["layer_shapes"])
    assert memory["budget"] == {"kind": "memory", "limit": int(0.8 * parent_bytes)}
    assert memory["cost"] == new.num_parameters() * 2 + new.kv_cache_bytes_per_token() * 64 * 2 <= 0.8 * parent_bytes


@pytest.mark.parametrize("budget, tp, says", [
    (OUTSIDE_LAYERS - 1, 1, "no per-layer architecture meets it; the smallest the scored variants allow is 138.4K"),
    (CHEAPEST_TP1 - 1, 1, "only removing the attention of every layer would meet it (no attention left); the "
                          "smallest per-layer architecture with attention is 138.4K"),
    (CHEAPEST_TP2 - 1, 2, "the smallest per-layer architecture with attention is 140.4K at --tp 2"),
])
def test_per_layer_budgets_refused(scored, tiny_checkpoint, capsys, budget, tp, says):
    """A budget no architecture meets, one only an attention-free model meets, and one whose
    only architectures TP cannot split: one line, exit 2 (plan, and prune before any weight)."""
    code, err = cli_in_process(capsys, "plan", tiny_checkpoint("llama"), "--per-layer", "--importance", scored,
                               "--target-params", str(budget), "--tp", str(tp))
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    if budget != OUTSIDE_LAYERS - 1:  # one more parameter (at --tp 1) is enough
        assert cli_in_process(capsys, "plan", tiny_checkpoint("llama"), "--per-layer", "--importance", scored,
                              "--target-params", str(budget + 1))[0] == 0


def test_plan_per_layer_under_a_flops_budget(scored, tiny_checkpoint, tmp_path, capsys):
    """plan --per-layer --target-flops: the chosen model's FLOPs per token at --flops-context,
    counted from its matrices, are within the budget and are the reported cost; the table
    names the budget."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.cli import main

    desc = read_info(tiny_checkpoint("llama")).description
    limit = int(round(0.7 * _model_flops(desc, 256), -3))
    out = tmp_path / "flops.json"
    capsys.readouterr()
    code = main(["plan", str(tiny_checkpoint("llama")), "--per-layer", "--importance", str(scored), "--target-flops",
                 f"{limit // 1000}K", "--flops-context", "256", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"FLOPs per token (forward, at context 256) (budget {limit // 1000}K)" in printed.out, printed.out
    choice = json.loads(out.read_text())
    counted = written_out_flops(desc, choice["layer_shapes"], 256)
    assert choice["budget"] == {"kind": "flops", "limit": limit}
    assert choice["cost"] == choice["flops_per_token"] == counted <= limit and choice["flops_context"] == 256
    assert counted > 0.6 * _model_flops(desc, 256)  # the budget binds: not far below it


# the tiny llama's least FLOPs per token at context 256: the output layer (2 x 64 x 1000), and
# with attention kept somewhere, one layer's attention of one K/V group: its projections
# (64 -> 4 heads x 16, 64 -> 2 x 16, 64 <- 64) and 4 heads over 128 keys on average
FLOPS_OUTPUT = 128_000
FLOPS_CHEAPEST = FLOPS_OUTPUT + 2 * (64 * 64 + 2 * 64 * 16 + 64 * 64) + 2 * 4 * 2 * 16 * 128  # 181,248


@pytest.mark.parametrize("budget, says", [
    (FLOPS_OUTPUT - 1, "--target-flops 128K: no per-layer architecture meets it; the smallest the scored variants "
                       "allow is 181.2K FLOPs per token (forward, at context 256)"),
    (FLOPS_CHEAPEST - 1, "--target-flops 181.2K: only removing the attention of every layer would meet it (no "
                         "attention left); the smallest per-layer architecture with attention is 181.2K"),
])
def test_per_layer_flops_budget_refused(scored, tiny_checkpoint, capsys, budget, says):
    """A FLOPs budget no architecture meets (below the output layer's), or that only an
    attention-free model meets: one line, exit 2; one FLOP more than the cheapest is enough."""
    args = ("plan", tiny_checkpoint("llama"), "--per-layer", "--importance", scored, "--flops-context", "256")
    code, err = cli_in_process(capsys, *args, "--target-flops", str(budget))
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert cli_in_process(capsys, *args, "--target-flops", str(FLOPS_CHEAPEST))[0] == 0


def test_per_layer_flags_refused(scored, tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("llama")
    for args, says in (
        (("--per-layer",), "--per-layer needs exactly one budget"),
        (("--per-layer", "--target-params", "1M", "--target-memory", "1GB"), "--per-layer needs exactly one budget"),
        (("--target-memory", "1GB"), "--target-memory is a --per-layer budget"),
        (("--per-layer", "--target-memory", "lots"), "--target-memory must be a size in bytes"),
        (("--per-layer", "--target-flops", "1G", "--target-params", "1M"), "--per-layer needs exactly one budget: "
         "--target-params, --target-active-params, --target-memory or --target-flops (got --target-params, "
         "--target-flops)"),
        (("--target-flops", "1G"), "--target-flops is a --per-layer budget; add --per-layer"),
        (("--per-layer", "--target-flops", "1.2GFLOPs"), "--target-flops must be a number with an optional K/M/G/T "
                                                         "suffix, e.g. 350M or 1.2G (got '1.2GFLOPs')"),
        (("--per-layer", "--target-flops", "1G", "--flops-context", "0"), "--flops-context"),
        (("--per-layer", "--target-params", "1M", "--target", "ffn=64"), "--per-layer chooses every layer's shape"),
    ):
        code, err = cli_in_process(capsys, "prune", ckpt, "--importance", scored, "--out", tmp_path / "p", *args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (args, err)
    code, err = cli_in_process(capsys, "prune", ckpt, "--importance", tiny_checkpoint("llama"), "--out",
                               tmp_path / "p", "--per-layer", "--target-params", "200K")
    assert code == 2 and "is not an importance directory" in err, err
    # widths of 32 and 64 (--ffn-multiple 32): megatron builds them, the Llama-Nemotron export cannot state them
    code, err = cli_in_process(capsys, "prune", ckpt, "--importance", scored, "--out", tmp_path / "p", "--per-layer",
                               "--target-params", "200K")
    assert code == 2 and "--per-layer: the Hugging Face export cannot state the chosen shapes" in err \
        and "not representable" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------- recipes and the report's plot
def _per_layer_recipe(tmp_path, prune: str = "per_layer: true, target_params: 84.5M"):
    """The demo recipe with its round pruned per layer (``prune``: the round's prune keys)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "recipes" / "smollm2-135m.yaml").read_text()
    uniform = "target: {hidden: 480, ffn: 1024, heads: 6, query_groups: 3}"
    assert uniform in text
    path = tmp_path / "per_layer.yaml"
    path.write_text(text.replace(uniform, "{" + prune + "}").replace("prune:\n      {", "prune: {")
                    .replace("}   # 134.5M -> 84.5M\n      order: importance", "}"))
    return path


@pytest.mark.parametrize("prune, overrides, words", [
    ("per_layer: true, target_params: 84.5M", [],
     ["'rounds.0.prune.per_layer' chooses from block-variant scores", "rounds.0.importance.block_variants: true"]),
    ("per_layer: true, target_params: 84.5M", ["rounds=[{importance: {block_variants: true}, prune: {per_layer: true, target_params: 84.5M}}, "
      "{prune: {target_params: 60M}}]"],
     ["a per-layer model is not pruned again"]),
    ("per_layer: true", ["rounds.0.importance.block_variants=true"],
     ["'rounds.0.prune.per_layer' needs exactly one budget"]),
    ("per_layer: true, target_params: 84.5M, target_flops: 1.2G", ["rounds.0.importance.block_variants=true"],
     ["'rounds.0.prune.per_layer' needs exactly one budget", "(got recipe key 'rounds.0.prune.target_params', "
                                                              "recipe key 'rounds.0.prune.target_flops')"]),
    ("target_flops: 1.2G", [], ["'rounds.0.prune.target_flops' is a recipe key 'rounds.0.prune.per_layer' budget"]),
    ("per_layer: true, target_params: 84.5M, refit: true", ["rounds.0.importance.block_variants=true"],
     ["'rounds.0.prune.refit' solves with the second moments", "'rounds.0.importance.second_moments: true'"]),
    ("per_layer: true, target_params: 84.5M, refit: true", ["rounds.0.importance.block_variants=true",
                                                            "rounds.0.importance.second_moments=true",
                                                            "rounds.0.importance.block_distill_steps=2"],
     ["'rounds.0.prune.refit' with 'rounds.0.prune.per_layer'", "'rounds.0.importance.block_distill_steps'"]),
    ("per_layer: true, target_flops: 1.2 GFLOPs", ["rounds.0.importance.block_variants=true"],
     ["'rounds.0.prune.target_flops' must be a number with an optional K/M/G/T suffix"]),
])
def test_per_layer_recipe_errors_name_the_key(tmp_path, prune, overrides, words):
    from nemo_minitron.errors import UsageError
    from nemo_minitron.pipeline.recipe import load_recipe

    with pytest.raises(UsageError) as e:
        load_recipe(_per_layer_recipe(tmp_path, prune), overrides)
    for word in words:
        assert word in str(e.value)


def test_per_layer_recipe_loads_and_preflight_checks_its_budget(smollm2, tmp_path):
    from nemo_minitron.config import recipe_names
    from nemo_minitron.errors import UsageError
    from nemo_minitron.pipeline.recipe import load_recipe
    from nemo_minitron.prune.per_layer import check_per_layer_budget

    recipe = load_recipe(_per_layer_recipe(tmp_path), ["rounds.0.importance.block_variants=true"])
    rnd = recipe.rounds[0]
    assert rnd.prune.per_layer and rnd.prune.target_params == "84.5M"
    from nemo_minitron.checkpoint.store import read_info

    desc = read_info(smollm2["checkpoint"]).description
    check_per_layer_budget(desc, rnd.importance, rnd.prune, 1, recipe_names("rounds.0.prune"))
    rnd.prune.target_params = "20M"  # less than the embeddings alone (28.3M)
    with pytest.raises(UsageError, match="recipe key 'rounds.0.prune.target_params' 20M: no per-layer architecture"):
        check_per_layer_budget(desc, rnd.importance, rnd.prune, 1, recipe_names("rounds.0.prune"))


def test_per_layer_recipe_takes_a_flops_budget(tmp_path):
    """``prune.per_layer`` with ``target_flops`` and ``flops_context``: the recipe's preflight
    check counts at that context and names the key when no architecture meets the budget."""
    from nemo_minitron.config import recipe_names
    from nemo_minitron.errors import UsageError
    from nemo_minitron.pipeline.recipe import load_recipe
    from nemo_minitron.prune.per_layer import check_per_layer_budget

    recipe = load_recipe(_per_layer_recipe(tmp_path, "per_layer: true, target_flops: 0.3M, flops_context: 256"),
                         ["rounds.0.importance.block_variants=true"])
    rnd, names = recipe.rounds[0], recipe_names("rounds.0.prune")
    assert (rnd.prune.target_flops, rnd.prune.flops_context) == ("0.3M", 256)
    desc = _tiny_desc()
    check_per_layer_budget(desc, rnd.importance, rnd.prune, 1, names)  # 300K: above 181,248, the least at 256
    rnd.prune.flops_context = 2048  # one attention alone now takes 2 x 4 x 2 x 16 x 1024 = 262,144 more
    with pytest.raises(UsageError, match="recipe key 'rounds.0.prune.target_flops' 300K: only removing the attention"):
        check_per_layer_budget(desc, rnd.importance, rnd.prune, 1, names)


def test_layer_shapes_figure_draws_each_layer():
    from nemo_minitron.model.description import LayerShape
    from nemo_minitron.prune.plots import layer_shapes_figure

    shapes = [LayerShape(3, 1536), LayerShape(1, 512), LayerShape(0, 1024), LayerShape(3, 0)]
    fig = layer_shapes_figure(shapes, 3, 1536, "t")
    top, bottom = fig.axes
    assert [p.get_height() for p in top.patches] == [3, 1, 0, 3]
    assert [p.get_height() for p in bottom.patches] == [1536, 512, 1024, 0]
    assert [tuple(xy) for xy in top.collections[0].get_offsets()] == [(2, 0)]      # the removed attention
    assert [tuple(xy) for xy in bottom.collections[0].get_offsets()] == [(3, 0)]   # the removed MLP


# ---------------------------------------------------------------------- prune --per-layer
#: forced per-layer choice of the tiny llama_wide_mlp (4 K/V groups, MLP 768): (groups, width) per
#: layer, every transform once: a narrowed MLP, a removed attention, merged groups, a removed MLP
FORCED = ((4, 256), (0, 768), (2, 768), (1, 0))


def forced_scores(source, out, forced, refit_widths=None):
    """A copy of llama_wide_mlp's importance directory ``source`` whose scores make ``forced``
    ((groups, width) per layer) the only choice of negative total score; where the run has
    refit scores of the MLP widths, those force ``refit_widths`` (default: ``forced``'s)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    tensors = load_file(str(out / "scores.safetensors"))
    variants = json.loads((out / "summary.json").read_text())["block_variants"]
    assert variants["query_groups"] == [4, 2, 1, 0] and variants["ffn"] == [768, 512, 256, 0]
    refit_widths = refit_widths or [width for _, width in forced]
    for kind, options, sizes in (("attention", variants["query_groups"], [groups for groups, _ in forced]),
                                 ("ffn", variants["ffn"], [width for _, width in forced]),
                                 ("ffn_refit", variants["ffn"], refit_widths)):
        if f"block_{kind}_kl" not in tensors:
            continue
        table = torch.ones(4, len(options))
        table[:, 0] = 0
        for layer, size in enumerate(sizes):
            table[layer, options.index(size)] = -1 if size != options[0] else 0
        tensors[f"block_{kind}_kl"] = table
    save_file(tensors, str(out / "scores.safetensors"))
    return out


@pytest.fixture(scope="module")
def per_layer_pruned(tiny_checkpoint, tmp_path_factory):
    """llama_wide_mlp's importance with block variants, its scores edited so that FORCED is the
    only choice of negative total score, and the checkpoint ``prune --per-layer`` makes from them
    (under a FLOPs budget that every choice meets: the parent's at context 1024). The importance
    run keeps its second moments for --refit."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.prune.api import prune

    root = tmp_path_factory.mktemp("per_layer_prune")
    parent = tiny_checkpoint("llama_wide_mlp")
    compute_importance(str(parent), ["builtin:calib"], str(root / "imp"), samples=SAMPLES, seq_len=SEQ,
                       layer_samples=1, block_variants=True, ffn_variants=2, block_samples=2, seed=SEED,
                       dtype="float32", second_moments=True, progress=False)
    forced = forced_scores(root / "imp", root / "forced", FORCED)
    desc = read_info(parent).description
    out = prune(str(parent), str(forced), str(root / "pruned"), per_layer=True,
                target_flops=str(_model_flops(desc, 1024)), flops_context=1024)
    return {"parent": parent, "pruned": out, "importance": forced, "root": root}


def _canonical(path):
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.model.params import named_weights

    model, info = load_checkpoint(str(path), dtype=torch.float32)
    return model, info.description, {n: p.detach().clone() for n, p in named_weights(model)}


def test_per_layer_prune_keeps_the_parents_weights(per_layer_pruned):
    """Every kept row and column is the parent's, bit for bit: the most important neurons of a
    narrowed MLP, each merged group's query heads (K and V: the mean of the run's), the norms,
    embeddings and output layer; removed blocks have no weights."""
    from nemo_minitron.importance.scores import ImportanceScores

    _, parent_desc, parent = _canonical(per_layer_pruned["parent"])
    _, desc, pruned = _canonical(per_layer_pruned["pruned"])
    assert tuple((s.num_query_groups, s.ffn_hidden_size) for s in desc.layer_shapes) == FORCED
    scores = ImportanceScores.load(per_layer_pruned["importance"])
    d, G = parent_desc.head_dim, parent_desc.num_query_groups
    hpg = parent_desc.heads_per_group
    for name, tensor in pruned.items():
        if not name.startswith("decoder.layers."):
            assert torch.equal(tensor, parent[name]), name
    for layer, (groups, width) in enumerate(FORCED):
        prefix = f"decoder.layers.{layer}."
        names = {n[len(prefix):] for n in pruned if n.startswith(prefix)}
        assert ("mlp.linear_fc1.weight" in names) == bool(width) and \
            ("self_attention.linear_qkv.weight" in names) == bool(groups), (layer, names)
        if width:
            neurons = torch.argsort(scores["ffn"][layer], descending=True, stable=True)[:width].sort().values
            gate, up = parent[prefix + "mlp.linear_fc1.weight"].chunk(2)
            assert torch.equal(pruned[prefix + "mlp.linear_fc1.weight"], torch.cat([gate[neurons], up[neurons]]))
            assert torch.equal(pruned[prefix + "mlp.linear_fc2.weight"],
                               parent[prefix + "mlp.linear_fc2.weight"][:, neurons])
        if groups:
            ranked = sorted(range(G), key=lambda j: (-float(scores["query_groups"][layer, j]), j))
            size = G // groups
            runs = sorted(sorted(ranked[k * size:(k + 1) * size]) for k in range(groups))
            qkv = parent[prefix + "self_attention.linear_qkv.weight"].view(G, hpg + 2, d, -1)
            new = pruned[prefix + "self_attention.linear_qkv.weight"].view(groups, size * hpg + 2, d, -1)
            proj, new_proj = parent[prefix + "self_attention.linear_proj.weight"], \
                pruned[prefix + "self_attention.linear_proj.weight"]
            for k, run in enumerate(runs):
                assert torch.equal(new[k, :size * hpg], qkv[run, :hpg].reshape(size * hpg, d, -1))
                for j, what in ((size * hpg, "k"), (size * hpg + 1, "v")):
                    mean = qkv[run, hpg + (what == "v")].double().mean(0)
                    assert torch.allclose(new[k, j].double(), mean, rtol=0, atol=fp32_mean_tol(size, mean)), what
                heads = [g * hpg + i for g in run for i in range(hpg)]
                columns = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
                assert torch.equal(new_proj[:, k * size * hpg * d:(k + 1) * size * hpg * d], proj[:, columns])
            for norm in ("input_layernorm.weight",):
                assert torch.equal(pruned[prefix + norm], parent[prefix + norm])
        if width:
            assert torch.equal(pruned[prefix + "pre_mlp_layernorm.weight"], parent[prefix + "pre_mlp_layernorm.weight"])


def fp32_mean_tol(n: int, values: torch.Tensor) -> float:
    return fp32(n, values.abs().max().item())


def test_per_layer_model_computes_the_scored_variants(per_layer_pruned):
    """The pruned per-layer model's logits equal the parent's with every chosen variant applied
    as the scores applied it (zeroed columns, mean K/V, zeroed projections)."""
    import contextlib

    from nemo_minitron.importance.blocks import attention_variant, ffn_variant
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.model.params import unwrap

    parent_model, parent_desc, _ = _canonical(per_layer_pruned["parent"])
    pruned_model, desc, _ = _canonical(per_layer_pruned["pruned"])
    scores = ImportanceScores.load(per_layer_pruned["importance"])
    tokens = torch.randint(0, desc.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    layers = unwrap(parent_model).decoder.layers
    with contextlib.ExitStack() as stack:
        for layer, (groups, width) in enumerate(FORCED):
            if width != parent_desc.ffn_hidden_size:
                stack.enter_context(ffn_variant(layers[layer], width, scores["ffn"][layer]))
            if groups != parent_desc.num_query_groups:
                stack.enter_context(attention_variant(layers[layer], parent_desc, groups,
                                                      scores["query_groups"][layer]))
        expected = full_logits(parent_model, tokens, desc.vocab_size)
    got = full_logits(pruned_model, tokens, desc.vocab_size)
    assert not torch.allclose(expected, full_logits(parent_model, tokens, desc.vocab_size))  # the variants matter
    tol = transformer_logits(parent_desc.ffn_hidden_size, desc.num_layers, expected)
    assert (got - expected).abs().max().item() <= tol


def test_per_layer_counts_equal_transformers(per_layer_pruned, tmp_path):
    """The pruned description's parameter count is what transformers counts in its export."""
    import transformers

    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.store import read_info

    hf = export(str(per_layer_pruned["pruned"]), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True, dtype=torch.float32)
    desc = read_info(per_layer_pruned["pruned"]).description
    assert model.num_parameters() == desc.num_parameters() < read_info(per_layer_pruned["parent"]).description \
        .num_parameters()


@pytest.mark.multirank
def test_per_layer_prune_at_tp2_and_pp2_equals_tp1(per_layer_pruned, tmp_path):
    """prune --per-layer (and with --refit) on the parent loaded at TP=2 and at PP=2 writes
    exactly the TP=1 weights (the worker also counts the parameters held across ranks). One
    group per layer does not split over 2 ranks: the scores here make 2 groups the best
    choice instead."""
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import run_workers
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.api import prune

    importance = tmp_path / "imp"
    shutil.copytree(per_layer_pruned["importance"], importance)
    tensors = load_file(str(importance / "scores.safetensors"))
    tensors["block_attention_kl"][3] = torch.tensor([0.0, -1.0, 1.0, 1.0])  # layer 3: 2 groups
    save_file(tensors, str(importance / "scores.safetensors"))
    parent = per_layer_pruned["parent"]
    options = {"per_layer": True, "target_params": str(read_info(parent).description.num_parameters())}
    _, _, want = _canonical(prune(str(parent), str(importance), str(tmp_path / "tp1"), **options))
    assert [(s.num_query_groups, s.ffn_hidden_size) for s in read_info(tmp_path / "tp1").description.layer_shapes] \
        == [(4, 256), (0, 768), (2, 768), (2, 0)]
    _, _, want_refit = _canonical(prune(str(parent), str(importance), str(tmp_path / "tp1-refit"), refit=True,
                                        **options))
    assert not torch.equal(want_refit["decoder.layers.0.mlp.linear_fc2.weight"],
                           want["decoder.layers.0.mlp.linear_fc2.weight"])  # layer 0's MLP is narrowed: refit
    jobs = [{"checkpoint": str(parent), "importance": str(importance),
             "out": str(tmp_path / "workers" / f"{{layout}}{suffix}"), "options": {**options, **extra}}
            for suffix, extra in (("", {}), ("-refit", {"refit": True}))]
    (tmp_path / "jobs.json").write_text(json.dumps({"layouts": {"tp2": [2, 1], "pp2": [1, 2]}, "jobs": jobs}))
    run_workers("prune_parallel.py", tmp_path / "jobs.json", out=tmp_path / "workers")
    for layout in ("tp2", "pp2"):
        for suffix, expected in (("", want), ("-refit", want_refit)):
            _, _, got = _canonical(tmp_path / "workers" / f"{layout}{suffix}")
            assert got.keys() == expected.keys()
            for k in expected:
                if suffix and k.endswith("mlp.linear_fc2.weight"):
                    # the refit is one float64 solve, rounded to float32; the ranks' solve runs
                    # on one thread, the in-process one on more (another blocking of the same
                    # sums), so an entry may round to the neighbouring float32 (seen on torch
                    # 2.14): one unit in the last place of each entry
                    ulp = torch.finfo(torch.float32).eps * expected[k].abs()
                    assert ((got[k] - expected[k]).abs() <= ulp).all(), (layout + suffix, k)
                else:
                    assert torch.equal(got[k], expected[k]), (layout + suffix, k)


#: layer: two MLP widths (with and without merged groups), a layer kept whole, a removed MLP
REFIT_PLAN = ((4, 512), (2, 256), (4, 768), (1, 0))


@pytest.fixture(scope="module")
def per_layer_refit(per_layer_pruned):
    """REFIT_PLAN pruned per layer from the same importance run, without and with --refit."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.api import prune

    root, parent = per_layer_pruned["root"], per_layer_pruned["parent"]
    importance = forced_scores(per_layer_pruned["importance"], root / "refit_imp", REFIT_PLAN)
    options = {"per_layer": True, "target_flops": str(_model_flops(read_info(parent).description, 1024)),
               "flops_context": 1024}
    plain = prune(str(parent), str(importance), str(root / "plain"), **options)
    refit = prune(str(parent), str(importance), str(root / "refit"), refit=True, **options)
    return {"parent": parent, "importance": importance, "plain": plain, "refit": refit}


def _ridge_solution(gram: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """The kept columns V minimising sum_t ||W x_t - V x_t[kept]||^2 + ridge ||V - W[:, kept]||^2
    over the tokens whose Gram matrix is ``gram``: the objective's normal equations
    (G[k, k] + ridge I) V^T = G[k, :] W^T + ridge W[:, k]^T, solved by Cholesky."""
    g, w = gram.double(), weight.double()
    lhs = g[kept][:, kept] + ridge * torch.eye(len(kept), dtype=torch.float64)
    rhs = g[kept] @ w.T + ridge * w[:, kept].T
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(lhs)).T


def _assert_least_squares(got: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor,
                          what) -> None:
    """``got`` (float32) is refit.py's ridge solution for the ``kept`` columns of ``weight`` on
    the tokens of ``gram``, up to the float64 solves' error and the rounding to float32."""
    from nemo_minitron.prune.refit import DEFAULT_DAMPING
    from tolerances import U32, fp64_solve

    g = gram.double()
    gkk = g[kept][:, kept]
    ridge = DEFAULT_DAMPING * gkk.diagonal().mean().item()  # refit.py's damping of the kept diagonal
    want = _ridge_solution(g, weight, kept, ridge)
    eig = torch.linalg.eigvalsh(gkk)
    condition = ((eig[-1] + ridge) / (eig[0] + ridge)).item()
    magnitude = want.abs().max().item()
    # the product's float64 solve and this one, then its rounding to float32
    tol = fp64_solve(len(kept), condition, magnitude) + U32 * magnitude
    assert (got.double() - want).abs().max().item() <= tol, (what, tol)


def test_per_layer_refit_is_each_layers_least_squares_solution(per_layer_refit):
    """--per-layer --refit: each narrowed MLP's second linear is the least-squares solution for
    that layer's own kept neurons and width, from that layer's second moments; every other
    tensor (a removed MLP, a layer kept whole, every output projection: merging K/V groups
    removes no query head) is bit-equal to the prune without refit; and on the calibration
    tokens each refit layer reproduces the parent's MLP output better than the plain cut."""
    from safetensors.torch import load_file

    from nemo_minitron.importance.scores import ImportanceScores

    _, _, parent = _canonical(per_layer_refit["parent"])
    _, plain_desc, plain = _canonical(per_layer_refit["plain"])
    _, desc, refit = _canonical(per_layer_refit["refit"])
    assert tuple((s.num_query_groups, s.ffn_hidden_size) for s in desc.layer_shapes) == REFIT_PLAN == \
        tuple((s.num_query_groups, s.ffn_hidden_size) for s in plain_desc.layer_shapes)
    assert refit.keys() == plain.keys()
    scores = ImportanceScores.load(per_layer_refit["importance"])
    grams = load_file(str(per_layer_refit["importance"] / "second_moments.safetensors"))["fc2_gram"]
    narrowed = {layer for layer, (_, width) in enumerate(REFIT_PLAN) if width not in (0, 768)}
    assert narrowed == {0, 1}
    for name in refit:
        fc2 = [layer for layer in narrowed if name == f"decoder.layers.{layer}.mlp.linear_fc2.weight"]
        if not fc2:
            assert torch.equal(refit[name], plain[name]), name
            continue
        layer, width = fc2[0], REFIT_PLAN[fc2[0]][1]
        kept = torch.argsort(scores["ffn"][layer], descending=True, stable=True)[:width].sort().values
        w, g = parent[name], grams[layer].double()
        _assert_least_squares(refit[name], w, g, kept, name)
        assert not torch.equal(refit[name], plain[name]), name  # the refit changed something

        def residual(v: torch.Tensor) -> float:  # sum over the calibration tokens of ||W x - V x[kept]||^2
            d = w.double().clone()
            d[:, kept] -= v.double()
            return torch.einsum("oi,ij,oj->", d, g, d).item()

        assert residual(refit[name]) < residual(plain[name]), layer


def test_per_layer_refit_brings_the_model_closer_to_the_parent(per_layer_refit):
    """On the calibration samples the second moments came from, the per-layer model with
    --refit is closer to the parent (logit MSE) than the one without."""
    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples
    from nemo_minitron.model.forward import full_logits

    parent_model, parent_desc, _ = _canonical(per_layer_refit["parent"])
    corpus = check_corpus(["builtin:calib"], vocab_size=parent_desc.vocab_size)
    samples = calibration_samples(corpus, load_tokenizer(per_layer_refit["parent"]), seq_len=SEQ, samples=SAMPLES,
                                  seed=SEED)
    tokens = samples[:, :-1]
    want = full_logits(parent_model, tokens, parent_desc.vocab_size).double()
    errors = {}
    for kind in ("plain", "refit"):
        model, desc, _ = _canonical(per_layer_refit[kind])
        errors[kind] = (full_logits(model, tokens, desc.vocab_size).double() - want).square().mean().item()
    assert errors["refit"] < errors["plain"], errors


#: enough calibration tokens (80 x 24) for full-rank second moments of llama_wide_mlp's 768 neurons
REFIT_SAMPLES, REFIT_BLOCK_SAMPLES = 80, 2


@pytest.fixture(scope="module")
def refit_scored(tiny_checkpoint, tmp_path_factory):
    """llama_wide_mlp's importance with block variants and second moments: refit scores."""
    from nemo_minitron.importance.api import compute_importance

    out = tmp_path_factory.mktemp("refit_scores") / "imp"
    compute_importance(str(tiny_checkpoint("llama_wide_mlp")), ["builtin:calib"], str(out), samples=REFIT_SAMPLES,
                       seq_len=SEQ, layer_samples=1, block_variants=True, ffn_variants=2,
                       block_samples=REFIT_BLOCK_SAMPLES, seed=SEED, dtype="float32", second_moments=True,
                       progress=False)
    return out


def _down_proj_grams(hf, samples) -> list[torch.Tensor]:
    """Per layer, sum over the tokens of ``samples`` of x x^T at down_proj's input (float64)."""
    grams = [None] * len(hf.model.layers)

    def hook(i):
        def record(module, args):
            x = args[0].detach().flatten(0, 1).double()
            grams[i] = x.T @ x if grams[i] is None else grams[i] + x.T @ x
        return record

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(samples[:, :-1])
    for h in handles:
        h.remove()
    return grams


def test_refit_scores_equal_a_refit_reference(refit_scored, tiny_checkpoint, tiny_hf):
    """With --second-moments, each MLP width is scored a second time refit: the stored loss
    change and KL equal transformers' model whose layer's MLP is resized to the kept neurons
    with the least-squares (ridge) down projection fit on the calibration tokens other than
    the scored ones; removal keeps the unrefit column, and the refit changes every narrowed
    width's loss change."""
    import transformers

    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.prune.refit import DEFAULT_DAMPING

    scores = ImportanceScores.load(refit_scored)
    recorded = scores.summary["block_variants"]
    assert recorded["refit_scores"] and recorded["ffn"] == [768, 512, 256, 0]
    checkpoint = tiny_checkpoint("llama_wide_mlp")
    desc = read_info(checkpoint).description
    corpus = check_corpus(["builtin:calib"], vocab_size=desc.vocab_size)
    calibration = calibration_samples(corpus, load_tokenizer(checkpoint), seq_len=SEQ, samples=REFIT_SAMPLES,
                                      seed=SEED)
    scored, others = calibration[:REFIT_BLOCK_SAMPLES], calibration[REFIT_BLOCK_SAMPLES:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf("llama_wide_mlp"), dtype=torch.float32).eval()
    grams = _down_proj_grams(hf, others)
    parent_loss, parent_logp, logits = _loss_and_logp(hf, scored, desc.vocab_size)
    tol = 2 * (transformer_logits(desc.ffn_hidden_size, desc.num_layers, logits)
               + log_softmax_sum(desc.vocab_size, logits.abs().max().item()))
    for layer in range(desc.num_layers):
        for j, width in enumerate(recorded["ffn"]):
            if width in (0, desc.ffn_hidden_size):
                for metric in ("loss", "kl"):
                    assert scores[f"block_ffn_refit_{metric}"][layer, j] == scores[f"block_ffn_{metric}"][layer, j]
                continue
            kept = torch.argsort(scores["ffn"][layer], descending=True, stable=True)[:width].sort().values
            g = grams[layer]
            ridge = DEFAULT_DAMPING * g[kept][:, kept].diagonal().mean().item()
            model = copy.deepcopy(hf)
            model.model.layers[layer].mlp = _resized_mlp(hf, layer, kept)
            with torch.no_grad():
                model.model.layers[layer].mlp.down_proj.weight.copy_(
                    _ridge_solution(g, hf.model.layers[layer].mlp.down_proj.weight, kept, ridge).float())
            loss, logp, _ = _loss_and_logp(model, scored, desc.vocab_size)
            kl = (parent_logp.exp() * (parent_logp - logp)).sum(-1).mean().item()
            assert scores["block_ffn_refit_loss"][layer, j].item() == pytest.approx(loss - parent_loss, abs=tol), \
                (layer, width)
            assert scores["block_ffn_refit_kl"][layer, j].item() == pytest.approx(kl, abs=tol), (layer, width)
            # the refit is not a no-op here: its loss change is told apart from the unrefit one
            assert abs(scores["block_ffn_refit_loss"][layer, j] - scores["block_ffn_loss"][layer, j]) > tol, \
                (layer, width)


def test_per_layer_refit_chooses_by_the_refit_scores(per_layer_pruned, tmp_path, capsys):
    """prune --per-layer --refit chooses the MLP widths by their refit scores, prune --per-layer
    by the unrefit ones: scores forcing different widths give each its own; plan --per-layer
    (--refit) shows the same choices."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.api import prune

    parent = per_layer_pruned["parent"]
    refit_widths = (512, 768, 256, 512)
    importance = forced_scores(per_layer_pruned["root"] / "imp", tmp_path / "imp", REFIT_PLAN, refit_widths)
    options = {"per_layer": True, "target_flops": str(_model_flops(read_info(parent).description, 1024)),
               "flops_context": 1024}
    for refit, widths in ((False, [width for _, width in REFIT_PLAN]), (True, list(refit_widths))):
        out = prune(str(parent), str(importance), str(tmp_path / f"refit-{refit}"), refit=refit, **options)
        info = read_info(out)
        assert [(s.num_query_groups, s.ffn_hidden_size) for s in info.description.layer_shapes] == \
            [(groups, width) for (groups, _), width in zip(REFIT_PLAN, widths)], refit
        assert info.provenance["per_layer"]["refit_scores"] is refit
        shown = tmp_path / f"plan-{refit}.json"
        code, err = cli_in_process(capsys, "plan", parent, "--per-layer", "--importance", importance, "--target-flops",
                                   options["target_flops"], "--flops-context", "1024", "--json", shown,
                                   *(["--refit"] if refit else ["--no-refit"]))
        assert code == 0, err
        assert json.loads(shown.read_text())["layer_shapes"] == \
            [[s.num_query_groups, s.ffn_hidden_size] for s in info.description.layer_shapes], refit
    code, err = cli_in_process(capsys, "plan", parent, "--target-params", "1M", "--refit")
    assert code == 2 and "--refit is for --per-layer" in err


def test_search_refit_prunes_every_candidate_refit(per_layer_pruned, tmp_path):
    """search --per-layer --refit: the per-layer candidate is the choice of the refit scores
    (forced here to other MLP widths than the unrefit ones), and in every candidate, uniform or
    per layer, each narrowed MLP's second linear is the least-squares solution for its layer's
    kept neurons; a layer whose MLP is kept whole keeps the parent's."""
    from safetensors.torch import load_file

    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.search.api import search

    parent = per_layer_pruned["parent"]
    refit_widths = (512, 768, 256, 512)
    importance = forced_scores(per_layer_pruned["root"] / "imp", tmp_path / "imp", REFIT_PLAN, refit_widths)
    budget = str(_model_flops(read_info(parent).description, 1024))
    out = tmp_path / "search"
    # the candidates: the uniform MLP-only shape (the parent's FLOPs less a step: ffn 704) and the optimum
    result = search(str(parent), str(importance), ["builtin:train"], str(out), progress=False, per_layer=True,
                    target_flops=budget, flops_context=1024, candidates=0, per_layer_candidates=1, refit=True, steps=1, global_batch=2, micro_batch=1, seq_len=16, lr=1e-3,
                    warmup_steps=0, eval_every=1, eval_samples=2, cache_top_k=16, seed=3, keep_all=True,
                    dtype="float32")
    rows = {r["kind"]: r for r in result["candidates"]}
    assert sorted(rows) == ["mlp-only", "per-layer"] and rows["mlp-only"]["target"]["ffn"] == 704, rows
    assert rows["per-layer"]["layer_shapes"] == [[groups, width] for (groups, _), width in zip(REFIT_PLAN,
                                                                                            refit_widths)]
    scores = ImportanceScores.load(importance)
    grams = load_file(str(importance / "second_moments.safetensors"))["fc2_gram"]
    _, _, weights = _canonical(parent)
    refit_layers = 0
    for kind, row in rows.items():
        _, desc, pruned = _canonical(out / row["directory"] / "pruned")
        widths = [s.ffn_hidden_size for s in desc.layer_shapes] or [desc.ffn_hidden_size] * desc.num_layers
        for layer, width in enumerate(widths):
            name = f"decoder.layers.{layer}.mlp.linear_fc2.weight"
            if width == 768:
                assert torch.equal(pruned[name], weights[name]), (kind, layer)
                continue
            kept = torch.argsort(scores["ffn"][layer], descending=True, stable=True)[:width].sort().values
            _assert_least_squares(pruned[name], weights[name], grams[layer], kept, (kind, layer))
            assert not torch.equal(pruned[name], weights[name][:, kept]), (kind, layer)  # not the plain cut
            refit_layers += 1
    assert refit_layers == 4 + 3


def test_per_layer_refit_refused(per_layer_pruned, tiny_checkpoint, tmp_path, capsys):
    """--per-layer --refit: one line, exit 2, nothing written, with block variants trained by
    importance --block-distill-steps (they replace what refit would repair) and without
    second moments."""
    import shutil

    ckpt = per_layer_pruned["parent"]
    trained = tmp_path / "trained"
    shutil.copytree(per_layer_pruned["importance"], trained)
    summary = json.loads((trained / "summary.json").read_text())
    summary["block_variants"]["distill"] = {"steps": 2, "lr": 1e-4, "samples": 2, "batch": 1}
    (trained / "summary.json").write_text(json.dumps(summary))
    bare = tmp_path / "bare"
    shutil.copytree(per_layer_pruned["importance"], bare)
    (bare / "second_moments.safetensors").unlink()
    for importance, says in ((trained, "--refit with --per-layer: --importance"),
                             (bare, "--refit: '")):
        code, err = cli_in_process(capsys, "prune", ckpt, "--importance", importance, "--out", tmp_path / "p",
                                   "--per-layer", "--target-params", "10M", "--refit")
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert importance is bare or "--block-distill-steps" in err, err
    assert not (tmp_path / "p").exists()


def test_report_draws_the_per_layer_round(per_layer_pruned, tmp_path):
    """The report's per-layer section: the pruned checkpoint's shapes in a table and a PNG, and
    the budget they were chosen under."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.pipeline import report
    from nemo_minitron.prune.targets import format_count
    from nemo_minitron.pipeline.recipe import load_recipe

    recipe = load_recipe(_per_layer_recipe(tmp_path), ["rounds.0.importance.block_variants=true"])

    class Paths:
        def prune(self, i):
            return per_layer_pruned["pruned"]

    found = report._per_layer(recipe, Paths(), tmp_path)
    record = found[recipe.rounds[0].name]
    assert [tuple(s) for s in record["layer_shapes"]] == list(FORCED)
    assert record["parent"] == {"query_groups": 4, "ffn": 768}
    assert (tmp_path / record["plot"]).stat().st_size > 0
    lines = report._per_layer_markdown(recipe.rounds[0].name, record)
    assert "| 1 | 0 | 768 |" in lines and "| 3 | 1 | 0 |" in lines
    # the budget it was chosen under, and the chosen model's FLOPs counted from its matrices
    parent = read_info(per_layer_pruned["parent"]).description
    limit = _model_flops(parent, 1024)
    assert record["cost"] == written_out_flops(parent, FORCED, 1024) < limit
    assert f"under the budget of {format_count(limit).replace('B', 'G')} FLOPs per token (forward, at context 1024)" \
        in lines[3], lines[3]


@pytest.mark.parametrize("kind, args, says", [
    ("llama", ("--tp", "2"), "--block-variants scores at --tp 1 --pp 1 (got --tp 2 --pp 1)"),
    ("mixtral", (), "per-layer variants are for dense transformer models; this mixtral model has experts"),
])
def test_block_variants_refused(tiny_checkpoint, tmp_path, capsys, kind, args, says):
    code, err = cli_in_process(capsys, "importance", tiny_checkpoint(kind), "--data", "builtin:calib", "--out",
                               tmp_path / "imp", "--seq-len", "16", "--block-variants", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "imp").exists()


def test_per_layer_recipe_runs_end_to_end(tiny_hf, tmp_path):
    """A recipe round pruned per layer: distilled, exported as Llama-Nemotron, reported with its plot."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, TESTS
    from nemo_minitron.checkpoint.store import read_info

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "nemo_minitron", "run", str(TESTS / "recipes" / "tiny_per_layer.yaml"),
                           f"model.source={tiny_hf('llama_wide_mlp')}", f"output_dir={out}",
                           f"data.cache_dir={tmp_path / 'cache'}"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    desc = read_info(out / "per-layer-2-prune").description
    assert desc.is_heterogeneous and desc.num_parameters() <= 600_000
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["per_layer"]["per-layer"]["layer_shapes"] == [[s.num_query_groups, s.ffn_hidden_size]
                                                                 for s in desc.layer_shapes]
    assert (out / "report" / "per-layer-per-layer.png").is_file()
    assert "## Per-layer architecture: per-layer" in (out / "report" / "report.md").read_text()
    assert json.loads((out / "export" / "config.json").read_text())["model_type"] == "nemotron-nas"


@pytest.mark.multirank
def test_block_scores_at_dp2_equal_one_rank(scored, tiny_checkpoint, tmp_path):
    """Two data-parallel ranks share the block samples: the summed scores are one rank's."""
    from conftest import run_workers
    from nemo_minitron.importance.scores import BLOCK_AXES, ImportanceScores

    options = {"samples": SAMPLES, "seq_len": SEQ, "micro_batch": 1, "layer_samples": 1, "drop_blocks": [],
               "block_variants": True, "ffn_variants": FFN_VARIANTS, "ffn_multiple": FFN_MULTIPLE,
               "block_samples": BLOCK_SAMPLES, "seed": SEED, "dtype": "float32"}
    spec = {"out": str(tmp_path / "out"), "layouts": {"dp2": [1, 1]}, "models": {"llama": str(tiny_checkpoint("llama"))},
            "options": options}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_workers("importance_layouts.py", tmp_path / "spec.json", out=tmp_path / "out")
    one, two = ImportanceScores.load(scored), ImportanceScores.load(tmp_path / "out" / "dp2-llama")
    # each rank's forward may split its products over other threads: logits (below 1 in the tiny
    # llama) within a float32 accumulation over 96-wide products through 2 x 4 + 1 of them,
    # then a difference of two log-softmax sums over the 1000-token vocabulary, for each side
    tol = 2 * (fp32(96 * (2 * 4 + 1), 1.0) + log_softmax_sum(1000, 1.0))
    for axis in BLOCK_AXES:
        assert (two[axis] - one[axis]).abs().max().item() <= tol, axis


@pytest.mark.multirank
def test_refit_scores_at_dp2_equal_one_rank(refit_scored, tiny_checkpoint, tmp_path):
    """Two data-parallel ranks share the block samples and leave them all out of the refit's
    second moments: the refit scores are one rank's. (Leaving out only a rank's own sample
    moves them by less than this tolerance here: 24 of 1,872 tokens.)"""
    from conftest import run_workers
    from nemo_minitron.importance.scores import BLOCK_AXES, REFIT_BLOCK_AXES, ImportanceScores

    options = {"samples": REFIT_SAMPLES, "seq_len": SEQ, "micro_batch": 1, "layer_samples": 1, "drop_blocks": [],
               "block_variants": True, "ffn_variants": 2, "block_samples": REFIT_BLOCK_SAMPLES, "seed": SEED,
               "dtype": "float32", "second_moments": True}
    spec = {"out": str(tmp_path / "out"), "layouts": {"dp2": [1, 1]},
            "models": {"llama_wide_mlp": str(tiny_checkpoint("llama_wide_mlp"))}, "options": options}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_workers("importance_layouts.py", tmp_path / "spec.json", out=tmp_path / "out")
    one, two = ImportanceScores.load(refit_scored), ImportanceScores.load(tmp_path / "out" / "dp2-llama_wide_mlp")
    # as test_block_scores_at_dp2_equal_one_rank (logits below 1), the MLP's products 768 wide; the
    # ranks' second moments differ only in the float64 order of their sums
    tol = 2 * (fp32(768 * (2 * 4 + 1), 1.0) + log_softmax_sum(1000, 1.0))
    for axis in BLOCK_AXES + REFIT_BLOCK_AXES:
        assert (two[axis] - one[axis]).abs().max().item() <= tol, axis
