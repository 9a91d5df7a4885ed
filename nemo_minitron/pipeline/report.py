"""The run's report: how good each model is, what it costs, and what each stage did.

Every model of the run (the input teacher, the corrected teacher, and each round's
pruned, sparse and distilled students) is evaluated on the same held-out samples and the same
downstream task examples (``report.tasks``, through lm-evaluation-harness). Writes
``report.md`` (for people), ``report.json`` (for programs) and PNG plots; a round that
chose its architecture by search gets the search's ranking and loss curves; a sparsified
round gets its zero fraction per layer and module (a table and a plot).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from nemo_minitron.checkpoint.store import atomic_directory, load_checkpoint, load_tokenizer, read_info
from nemo_minitron.checkpoint.verify import load_hf_model
from nemo_minitron.data.blend import blend_words
from nemo_minitron.evaluate import evaluate
from nemo_minitron.pipeline.corpora import data_corpus
from nemo_minitron.pipeline.recipe import Recipe
from nemo_minitron.prune.plots import layer_shapes_figure
from nemo_minitron.runtime.distributed import is_rank0
from nemo_minitron.runtime.plotting import pyplot, save_figure
from nemo_minitron.runtime.precision import ComputeDtype, resolve_dtype
from nemo_minitron.runtime.signals import received, stop_requested
from nemo_minitron.search.api import LAYERS_PLOT, PLOT, RESULT, shape_text
from nemo_minitron.tasks.api import resolve_tasks, run_tasks
from nemo_minitron.tasks.builtin import CHANCE
from nemo_minitron.tasks.lm import MegatronLM

log = logging.getLogger("nemo_minitron")

GENERATION_PROMPT = "The Python standard library"


def _models(recipe: Recipe, paths) -> list[tuple[str, Path]]:
    models = [("teacher (input)", paths.input_checkpoint())]
    if recipe.teacher_correction.enabled:
        models.append(("teacher (corrected)", paths.teacher_correction / "final"))
    for i, rnd in enumerate(recipe.rounds):
        models.append((f"{rnd.name}: pruned", paths.prune(i)))
        sparse = (f"{rnd.name}: sparse ({rnd.sparsify.pattern} {rnd.sparsify.method})", paths.sparsify(i)) \
            if rnd.sparsify is not None else None
        if sparse and rnd.sparsify.at == "before_distill":
            models.append(sparse)
        models.append((f"{rnd.name}: distilled" + (" with the masks" if sparse and rnd.sparsify.at ==
                                                  "before_distill" else ""), paths.distill(i) / "final"))
        if sparse and rnd.sparsify.at == "after_distill":
            models.append(sparse)
    return models


def _evaluate_all(recipe: Recipe, models: list[tuple[str, Path]], dtype: ComputeDtype) -> list[dict[str, Any]] | None:
    """Every model's row (collective); None when a stop signal came (asked after each model)."""
    cfg = recipe.report
    first = models[0][1]
    tokenizer = load_tokenizer(first)
    kwargs = dict(vocab_size=read_info(first).description.vocab_size, tokenizer=tokenizer)
    corpus = data_corpus(recipe, "heldout", **kwargs) or data_corpus(recipe, "train", **kwargs)
    samples = corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=recipe.seed, part="valid").first(cfg.eval_samples)
    tasks = None
    if cfg.tasks:
        tasks = resolve_tasks(cfg.tasks, cfg.tasks_path, flag="recipe key 'report.tasks'",
                              path_flag="recipe key 'report.tasks_path'")
    rows = []
    for name, path in models:
        model, info = load_checkpoint(path, dtype=dtype.torch)
        result = evaluate(model, info.description.vocab_size, samples, micro_batch=cfg.micro_batch)
        desc = info.description
        log.info("report: %s: loss %.4f, %s", name, result.loss, desc.summary())
        rows.append({"model": name, "checkpoint": str(path), "parameters": desc.num_parameters(),
                     "flops_per_token": desc.flops_per_token(cfg.flops_seq_len),
                     "kv_cache_bytes_per_token": desc.kv_cache_bytes_per_token(),
                     "heldout_loss": result.loss, "heldout_perplexity": result.perplexity,
                     "heldout_tokens": result.tokens, "shape": desc.summary(),
                     "tasks": _task_scores(name, model, desc, path, tasks, cfg, recipe.seed) if tasks else {}})
        del model
        if stop_requested():
            return None
    return rows


def _task_scores(name: str, model, desc, path: Path, tasks, cfg, seed: int) -> dict[str, dict[str, Any]]:
    lm = MegatronLM(model, desc, load_tokenizer(path), batch_size=cfg.micro_batch, seed=seed)
    results = run_tasks(lm, tasks, limit=cfg.task_limit, num_fewshot=cfg.num_fewshot, seed=seed)
    for r in results.values():
        log.info("report: %s: %s: %s", name, r.task, ", ".join(f"{k} {v:.3f}" for k, v in r.metrics.items()))
    return {task: r.to_dict() for task, r in results.items()}


def _task_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(task, metric) pairs to show: every metric that has a standard error, in task order."""
    columns: list[tuple[str, str]] = []
    for r in rows:
        for task, result in r.get("tasks", {}).items():
            for metric in result["metrics"]:
                if metric in result["stderr"] and (task, metric) not in columns:
                    columns.append((task, metric))
    return columns


def _plot_tasks(rows: list[dict[str, Any]], out: Path) -> str | None:
    """Grouped bars: one group per task metric, one bar per model, standard errors as
    whiskers, and a dashed line at chance for the built-in tasks."""
    columns = _task_columns(rows)
    if not columns:
        return None
    plt = pyplot()

    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) + 2), 4))
    for m, r in enumerate(rows):
        values = [r["tasks"].get(t, {}).get("metrics", {}).get(k, float("nan")) for t, k in columns]
        errors = [r["tasks"].get(t, {}).get("stderr", {}).get(k, 0.0) for t, k in columns]
        positions = [c + (m - (len(rows) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(positions, values, width, yerr=errors, capsize=3, label=r["model"])
    for c, (task, _) in enumerate(columns):
        if task in CHANCE:
            ax.hlines(CHANCE[task], c - 0.45, c + 0.45, colors="gray", linestyles="dashed")
    ax.set_xticks(range(len(columns)), [f"{t}\n{k}" for t, k in columns], fontsize=8)
    ax.set_ylabel("accuracy (± standard error; dashed: chance)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    name = "tasks.png"
    save_figure(fig, out / name)
    return name


def _read_metrics(directory: Path) -> list[dict[str, Any]]:
    file = directory / "metrics.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def distillation_figure(title: str, train: list[dict[str, Any]], evals: list[dict[str, Any]]):
    """The training loss (KD, left axis) and the held-out LM loss (right axis) over the steps:
    two y axes, as the two can differ by orders of magnitude (a KD loss of 0.003 next to a
    held-out loss of 6 would be a flat line on one axis)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue",
                    label="training loss (KD)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (KD)", color="tab:blue")
    ax.grid(alpha=0.3)
    if evals:
        right = ax.twinx()
        lines += right.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o-", color="tab:red",
                            label="held-out LM loss")
        right.set_ylabel("held-out LM loss", color="tab:red")
    ax.legend(lines, [line.get_label() for line in lines])
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot_curves(recipe: Recipe, paths, out: Path) -> list[str]:
    files = []
    for i, rnd in enumerate(recipe.rounds):
        records = _read_metrics(paths.distill(i))
        train = [r for r in records if "loss" in r and r.get("kind", "train") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        if not train:
            continue
        name = f"{rnd.name}-distillation.png"
        save_figure(distillation_figure(f"{rnd.name}: distillation", train, evals), out / name)
        files.append(name)
    return files


def _copy_importance_plots(recipe: Recipe, paths, out: Path) -> list[str]:
    files = []
    for i, rnd in enumerate(recipe.rounds):
        for png in sorted(paths.importance(i).glob("*.png")):
            name = f"{rnd.name}-{png.name}"
            shutil.copy2(png, out / name)
            files.append(name)
    return files


def _searches(recipe: Recipe, paths, out: Path) -> dict[str, dict[str, Any]]:
    """Each searched round's search.json (without its config), its plot copied into ``out``."""
    found = {}
    for i, rnd in enumerate(recipe.rounds):
        if rnd.search is None or not (paths.search(i) / RESULT).is_file():
            continue
        result = {k: v for k, v in _read_json(paths.search(i) / RESULT).items() if k != "config"}
        for key, plot in (("plot", PLOT), ("layers_plot", LAYERS_PLOT)):
            if (paths.search(i) / plot).is_file():
                result[key] = f"{rnd.name}-{plot}"
                shutil.copy2(paths.search(i) / plot, out / result[key])
        found[rnd.name] = result
    return found


def _search_markdown(name: str, result: dict[str, Any]) -> list[str]:
    rungs = [str(s) for s in result["rungs"][:-1]]
    source = "cached teacher logits" if result.get("teacher_logits") else "the live teacher"
    lines = ["", f"## Architecture search: {name}", "",
             f"{len(result['candidates'])} candidates for "
             f"{result.get('budget_text') or result['target_params'] + ' parameters'}, each pruned from the "
             f"same importance scores and distilled {result['steps']} steps from {source}"
             + (" (successive halving at steps " + ", ".join(rungs) + ")" if rungs else "")
             + f"; held-out loss on {result['eval_samples']} samples. The best ({result['best']}) is this round's "
             "pruned model.", "",
             "| rank | candidate | kind | parameters | FLOPs/token | KV cache bytes/token | loss after pruning | "
             + "".join(f"loss @{s} | " for s in rungs) + f"loss @{result['steps']} | shape |",
             "|---|---|---|---|---|---|---|" + "---|" * len(rungs) + "---|---|"]
    for r in sorted(result["candidates"], key=lambda r: r["rank"]):
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        final = fmt(r["final_loss"]) if r["final_loss"] is not None else f"stopped @{r['stopped_at']}"
        name_cell = f"**{r['name']}**" if r["name"] == result["best"] else r["name"]
        lines.append(f"| {r['rank']} | {name_cell} | {r['kind']} | {_fmt_count(r['params'])} "
                     f"| {_fmt_count(r['flops_per_token'])} | {r['kv_cache_bytes_per_token']:,} "
                     f"| {fmt(r['loss_after_pruning'])} | " + "".join(f"{fmt(r['rung_losses'].get(s))} | " for s in rungs)
                     + f"{final} | {shape_text(r)} |")
    for key in ("plot", "layers_plot"):
        if result.get(key):
            lines += ["", f"![{result[key]}]({result[key]})"]
    return lines


SPARSITY_MODULES = {"self_attention.linear_qkv.weight": "qkv", "self_attention.linear_proj.weight": "proj",
                    "mlp.linear_fc1.weight": "fc1", "mlp.linear_fc2.weight": "fc2"}


def _sparsity(recipe: Recipe, paths) -> dict[str, dict[str, Any]]:
    """Each sparsified round's record (the sparse checkpoint's provenance) with its zero
    fraction per layer and module."""
    found = {}
    for i, rnd in enumerate(recipe.rounds):
        if rnd.sparsify is None:
            continue
        record = dict(read_info(paths.sparsify(i)).provenance.get("sparsity") or {})
        per_layer: dict[str, dict[str, float]] = {}
        for name, fraction in record.get("weights", {}).items():
            layer, module = _layer_and_module(name)
            per_layer.setdefault(layer, {})[module] = fraction
        found[rnd.name] = {k: v for k, v in record.items() if k not in ("config", "weights")} | {"per_layer": per_layer}
    return found


def _layer_and_module(name: str) -> tuple[str, str]:
    if name == "output_layer.weight":
        return "output", "output"
    rest = name.split("decoder.layers.", 1)[1]
    layer, suffix = rest.split(".", 1)
    return layer, SPARSITY_MODULES.get(suffix, suffix)


def _sparsified_modules(record: dict[str, Any]) -> list[str]:
    order = [*SPARSITY_MODULES.values(), "output"]
    return sorted({m for v in record["per_layer"].values() for m in v}, key=order.index)


def _plot_sparsity(name: str, record: dict[str, Any], out: Path) -> str:
    """Zero fraction of every sparsified weight, by layer (one bar per module)."""
    plt = pyplot()
    layers = list(record["per_layer"])
    modules = _sparsified_modules(record)
    width = 0.8 / len(modules)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) * len(modules) + 2), 3.5))
    for k, module in enumerate(modules):
        values = [record["per_layer"][layer].get(module, 0.0) for layer in layers]
        ax.bar([x + (k - (len(modules) - 1) / 2) * width for x in range(len(layers))], values, width, label=module)
    ax.set_xticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of weights zero")
    ax.set_ylim(0, 1)
    ax.set_title(f"{name}: {record['pattern']} by {record['method']}")
    ax.legend(fontsize=8, ncol=len(modules))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    file = f"{name}-sparsity.png"
    fig.savefig(out / file, dpi=120)
    plt.close(fig)
    return file


def _sparsity_markdown(name: str, record: dict[str, Any]) -> list[str]:
    modules = _sparsified_modules(record)
    lines = ["", f"## Sparsity: {name}", "",
             f"{record['pattern']} by {record['method']} ({'sequential' if record.get('sequential') else 'one pass'} "
             f"calibration on {record.get('data')}): {record['zero_parameters']:,} of {record['masked_parameters']:,} "
             f"parameters of the sparsified weights are zero, {record['model_sparsity']:.1%} of the model. Zero "
             "fraction per layer:", "",
             "| layer | " + " | ".join(modules) + " |", "|---|" + "---|" * len(modules)]
    for layer, values in record["per_layer"].items():
        lines.append(f"| {layer} | " + " | ".join(f"{values[m]:.3f}" if m in values else "-" for m in modules) + " |")
    if record.get("plot"):
        lines += ["", f"![{record['plot']}]({record['plot']})"]
    return lines


def _generate_sample(export_dir: Path) -> str | None:
    if not (export_dir / "config.json").is_file():
        return None

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    model = load_hf_model(export_dir)
    inputs = tokenizer(GENERATION_PROMPT, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def write_report(recipe: Recipe, paths, out: Path) -> str | None:
    """Collective (evaluation runs on every rank); rank 0 writes the files, atomically.
    Returns None, or the stop signal (SIGTERM, SIGUSR1) that ended it before anything was
    written (a new start writes the whole report)."""
    dtype = resolve_dtype(recipe.dtype, "recipe key 'dtype'")
    rows = _evaluate_all(recipe, _models(recipe, paths), dtype)
    if rows is None:
        return received() or "a signal on another rank"
    stages = json.loads((paths.root / "stages.json").read_text()) if (paths.root / "stages.json").is_file() else {}
    with atomic_directory(out) as tmp:
        if not is_rank0():
            return None
        curves = _plot_curves(recipe, paths, tmp)
        task_plot = _plot_tasks(rows, tmp)
        importance_plots = _copy_importance_plots(recipe, paths, tmp)
        searches = _searches(recipe, paths, tmp)
        sparsity = _sparsity(recipe, paths)
        for name, record in sparsity.items():
            record["plot"] = _plot_sparsity(name, record, tmp)
        per_layer = _per_layer(recipe, paths, tmp)
        sample = _generate_sample(paths.export) if recipe.export.enabled else None
        summaries = {rnd.name: _read_json(paths.distill(i) / "summary.json") for i, rnd in enumerate(recipe.rounds)}
        report = {"recipe": recipe.name, "dtype": dataclasses.asdict(dtype), "models": rows, "stages": stages,
                  "search": searches, "sparsity": sparsity, "per_layer": per_layer, "distillation": summaries,
                  "export": str(paths.export) if recipe.export.enabled else None, "generation": sample}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(_markdown(recipe, rows, stages, curves, importance_plots, sample, paths,
                                                 task_plot, searches, summaries, dtype, sparsity, per_layer))
    return None


def _per_layer(recipe: Recipe, paths, out: Path) -> dict[str, dict[str, Any]]:
    """Each per-layer round's shapes (its pruned checkpoint's description) and their plot, drawn into ``out``."""
    found = {}
    for i, rnd in enumerate(recipe.rounds):
        if not rnd.prune.per_layer or rnd.search is not None:
            continue
        info = read_info(paths.prune(i))
        parent = info.provenance.get("parent_model", {})
        groups, ffn = parent.get("num_query_groups"), parent.get("ffn_hidden_size")
        shapes = info.description.layer_shapes
        plot = f"{rnd.name}-per-layer.png"
        save_figure(layer_shapes_figure(shapes, groups, ffn, f"{rnd.name}: per-layer architecture "
                                        f"({info.description.num_parameters() / 1e6:.1f}M parameters)"), out / plot)
        found[rnd.name] = {"layer_shapes": [[s.num_query_groups, s.ffn_hidden_size] for s in shapes],
                           "parent": {"query_groups": groups, "ffn": ffn}, "plot": plot,
                           **{k: v for k, v in info.provenance.get("per_layer", {}).items() if k != "variants"}}
    return found


def _per_layer_markdown(name: str, record: dict[str, Any]) -> list[str]:
    parent = record["parent"]
    budget = f" of {record['budget_text']}" if record.get("budget_text") else ""
    lines = ["", f"## Per-layer architecture: {name}", "",
             f"Each layer's attention and MLP chosen from the scored variants under the budget{budget} (summed score "
             f"{record.get('score', float('nan')):.4f}); parent: {parent['query_groups']} K/V groups, MLP "
             f"{parent['ffn']}; 0: removed.", "", "| layer | K/V groups | MLP width |", "|---|---|---|"]
    lines += [f"| {i} | {g} | {f} |" for i, (g, f) in enumerate(record["layer_shapes"])]
    return lines + ["", f"![{record['plot']}]({record['plot']})"]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _heldout_label(recipe) -> str:
    if recipe.data.heldout is None:
        words = blend_words(recipe.data.train, "data.train")
        return f"the validation part (data.split {recipe.data.split}) of {_words_label(words)}"
    return _words_label(blend_words(recipe.data.heldout, "data.heldout"))


def _words_label(words) -> str:
    return ", ".join(f"{w[0]:g} x {w[1]}" if isinstance(w, tuple) else w for w in words)


def _trained_on(name: str, summary: dict[str, Any]) -> str:
    """One line: what a round's student learned from, and how much."""
    config = summary.get("config") or {}
    method = config.get("method", "logits")
    if method == "synthetic":
        what = f"cross-entropy on the teacher's generations ({config.get('synthetic_data')})"
    elif method == "both":
        what = (f"KD on {config.get('data')} plus cross-entropy on the teacher's generations "
                f"({config.get('synthetic_data')}, {config.get('synthetic_fraction', 0):.0%} of the samples)")
    else:
        what = f"logit distillation (KD) on {config.get('data')}"
    return (f"- {name}: {what}; {summary.get('steps')} steps, {summary.get('tokens', 0):,} tokens, teacher "
            f"{summary.get('teacher')}")


def _markdown(recipe, rows, stages, curves, importance_plots, sample, paths, task_plot=None, searches=None,
              summaries=None, dtype: ComputeDtype | None = None, sparsity=None, per_layer=None) -> str:
    base = rows[0]
    lines = [f"# {recipe.name}", "",
             f"Held-out data: {_heldout_label(recipe)} ({rows[0]['heldout_tokens']} tokens, "
             f"sequence length {recipe.report.seq_len}). FLOPs per token at context {recipe.report.flops_seq_len}."
             + (f" Compute {dtype.describe()}." if dtype else ""), "",
             "| model | parameters | FLOPs/token | KV cache bytes/token | held-out loss | perplexity | vs. teacher |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {_fmt_count(r['parameters'])} ({r['parameters'] / base['parameters']:.0%}) "
                     f"| {_fmt_count(r['flops_per_token'])} | {r['kv_cache_bytes_per_token']:,} "
                     f"| {r['heldout_loss']:.4f} | {r['heldout_perplexity']:.2f} "
                     f"| {r['heldout_loss'] - base['heldout_loss']:+.4f} |")
    columns = _task_columns(rows)
    if columns:
        samples = {t: max(r["tasks"][t]["samples"] for r in rows if t in r["tasks"]) for t, _ in columns}
        lines += ["", "## Downstream tasks", "",
                  "Accuracy ± standard error (lm-evaluation-harness; " +
                  ", ".join(f"{t}: {n} examples" for t, n in samples.items()) + ").", "",
                  "| model | " + " | ".join(f"{t} {k}" for t, k in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for r in rows:
            cells = []
            for t, k in columns:
                res = r["tasks"].get(t)
                shown = res and k in res["metrics"]
                cells.append(f"{res['metrics'][k]:.3f} ± {res['stderr'][k]:.3f}" if shown else "-")
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        if task_plot:
            lines += ["", f"![{task_plot}]({task_plot})"]
    lines += ["", "Shapes:", ""] + [f"- {r['model']}: {r['shape']}" for r in rows]
    if stages:
        lines += ["", "## Stages", ""]
        if any(s.get("runs", 1) > 1 for s in stages.values()):
            lines += ["A stage that a stop signal ended and a new start continued: its wall time summed over its "
                      "runs, tokens/s over that sum.", ""]
        lines += ["| stage | wall time | tokens | tokens/s |", "|---|---|---|---|"]
        for name, s in stages.items():
            tps = f"{s['tokens_per_second']:,.0f}" if s.get("tokens_per_second") else "-"
            runs = f" ({s['runs']} runs)" if s.get("runs", 1) > 1 else ""
            lines.append(f"| {name} | {s['wall_seconds']:.0f} s{runs} | {s['tokens'] or '-'} | {tps} |")
    for name, result in (searches or {}).items():
        lines += _search_markdown(name, result)
    for name, record in (sparsity or {}).items():
        lines += _sparsity_markdown(name, record)
    for name, record in (per_layer or {}).items():
        lines += _per_layer_markdown(name, record)
    trained = [_trained_on(name, summary) for name, summary in (summaries or {}).items() if summary]
    if curves or trained:
        lines += ["", "## Distillation", ""] + trained + [""] + [f"![{c}]({c})" for c in curves]
    if importance_plots:
        lines += ["", "## Importance", ""] + [f"![{p}]({p})" for p in importance_plots]
    if recipe.export.enabled:
        lines += ["", "## Export", "", f"Hugging Face model: `{paths.export}` (load with "
                  "`transformers.AutoModelForCausalLM.from_pretrained`)."]
        if sample is not None:
            lines += ["", f"Greedy generation from the exported model, prompt \"{GENERATION_PROMPT}\":", "",
                      "> " + sample.replace("\n", " ")]
    return "\n".join(lines) + "\n"
