"""``search``: choose the pruned architecture by measuring it, as the Minitron paper does.

Loss right after pruning predicts the loss after retraining poorly, so every candidate
is pruned from the same importance scores, distilled for the same short schedule
(same data, seed, learning rates) and evaluated on the same held-out samples; the
lowest held-out loss at the end wins. With ``halving`` the candidates first train only
part of the schedule and the worse half stops there (successive halving; the learning
rate follows the full schedule throughout, so a survivor's run is the run it would have
had anyway). With a teacher-logit cache (given, or written first with ``cache_top_k``)
no candidate runs the teacher.

    OUT/config.yaml                       the resolved settings (a resumed search must match)
    OUT/teacher-logits/                   the cache, when cache_top_k asks for one
    OUT/candidates/cN-<shape>/pruned/     each candidate's pruned checkpoint (cN-per-layer: a per-layer one)
    OUT/candidates/cN-<shape>/distill/    its distillation (metrics.jsonl, final/)
    OUT/best/                             the winner's directory (pruned/, distill/final/)
    OUT/search.json                       every candidate: shape, cost, losses, curves; the winner
    OUT/search.png                        held-out loss curves
    OUT/search-layers.png                 with per-layer candidates: the best one's widths per layer

A killed search started again reuses every candidate's pruned checkpoint, finished
distillation and evaluations, and continues an unfinished distillation from its last
checkpoint. Only the winner is kept at the end unless ``keep_all``.

With ``per_layer`` the candidates also include per-layer architectures (candidates.py),
pruned as ``prune --per-layer`` prunes (the same importance run's block-variant scores)
and distilled and ranked like the uniform ones. With ``refit`` every candidate is pruned as
``prune --refit`` prunes (the per-layer ones chosen by the refit scores of the MLP widths).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import yaml

from nemo_minitron.checkpoint.store import is_checkpoint, load_tokenizer, read_info
from nemo_minitron.config import (
    Names,
    check_resume,
    log_settings,
    resume_safe_fields,
    to_dict,
    yaml_text,
)
from nemo_minitron.data.config import DataOptions
from nemo_minitron.distill import api as distill_api
from nemo_minitron.distill import teacher_logits as logit_cache
from nemo_minitron.distill.checkpointing import latest_checkpoint
from nemo_minitron.distill.checks import check_cache_settings, tokenizer_fingerprint
from nemo_minitron.distill.corpora import training_corpora
from nemo_minitron.distill.model import parse_pairs
from nemo_minitron.errors import require
from nemo_minitron.files import check_output_dir
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.model.description import LayerShape, ModelDescription
from nemo_minitron.prune import api as prune_api
from nemo_minitron.prune.config import PerLayerConfig
from nemo_minitron.prune.per_layer import Budget, export_refusal
from nemo_minitron.prune.plots import layer_shapes_figure
from nemo_minitron.prune.select import layers_to_keep, parse_layer_metric
from nemo_minitron.prune.targets import format_count
from nemo_minitron.runtime.config import RunConfig, stage_configs
from nemo_minitron.runtime.distributed import barrier, check_world_size, init_distributed, is_rank0
from nemo_minitron.runtime.plotting import pyplot, save_figure
from nemo_minitron.runtime.precision import log_compute_dtype, resolve_dtype
from nemo_minitron.search.candidates import SearchCandidate, search_budget, search_candidates
from nemo_minitron.search.config import SearchConfig

log = logging.getLogger("nemo_minitron")

RESULT = "search.json"
PLOT = "search.png"
LAYERS_PLOT = "search-layers.png"
CONFIG_FILE = "config.yaml"
CACHE_DIR = "teacher-logits"


def halving_rungs(steps: int, candidates: int) -> list[int]:
    """Steps at which candidates are compared: steps / 2^(n-1), ..., steps / 2, steps with
    n = ceil(log2(candidates)), so that two or more reach the end."""
    levels = max(1, math.ceil(math.log2(max(candidates, 1))))
    rungs = sorted({max(1, steps // 2 ** (levels - 1 - j)) for j in range(levels)} | {steps})
    return rungs


def survivors(losses: dict[str, float], alive: list[str]) -> list[str]:
    """The better half (rounded up, at least two) of ``alive`` by held-out loss; ties by name."""
    keep = max(2, math.ceil(len(alive) / 2))
    return sorted(alive, key=lambda n: (losses[n], n))[:keep]


def _read_metrics(directory: Path) -> list[dict[str, Any]]:
    file = directory / "metrics.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _curves(directory: Path) -> tuple[list[list[float]], list[list[float]]]:
    """(held-out [[step, loss]], training [[step, loss]]): one point per step (the last record)."""
    held, train = {}, {}
    for r in _read_metrics(directory):
        if r.get("kind") == "eval":
            held[r["step"]] = r["heldout_loss"]
        elif r.get("kind") == "train":
            train[r["step"]] = r["loss"]
    return [[s, held[s]] for s in sorted(held)], [[s, train[s]] for s in sorted(train)]


def _heldout_at(directory: Path, step: int) -> float | None:
    held, _ = _curves(directory)
    return next((loss for s, loss in held if s == step), None)


def search(checkpoint: str, importance: str, data: Sequence[str], out: str, config: SearchConfig | None = None, *,
           teacher: str | None = None, teacher_logits: str | None = None, eval_data: Sequence[str] | None = None,
           force: bool = False, progress: bool = True, names: Names | None = None, data_names: Names | None = None,
           force_hint: str = "--force", **options: Any) -> dict[str, Any]:
    """Search the pruned architecture of ``checkpoint`` for the config's parameter budget
    (collective); returns the content of ``OUT/search.json``.

    ``teacher``: who teaches the candidates (default: ``checkpoint`` itself);
    ``teacher_logits``: a cache to distil from instead (or ``cache_top_k`` in the config
    to write one first); ``options``: SearchConfig fields, or ``tp``, ``pp``, ``seed``,
    ``dtype``, ``split``, ``cache_dir``."""
    configs = stage_configs(SearchConfig, config, options, names, data_names)
    cfg, run, data_opts, names, data_names = configs.stage, configs.run, configs.data, configs.names, configs.data_names
    tp, pp = configs.parallel.tp, configs.parallel.pp
    teacher = str(teacher or checkpoint)

    # ---- everything is checked before the first candidate is pruned
    original = read_info(checkpoint).description
    teacher_desc = read_info(teacher).description
    scores = ImportanceScores.load(importance)
    scores.check_matches(original)
    budget = search_budget(cfg, names)
    # every candidate is pruned with refit or every one without (auto: wherever it applies), decided
    # once: what prune would refuse is refused now, and the per-layer candidates are chosen by it
    cfg.refit = prune_api.resolve_refit(cfg.refit, original, importance, scores, names, per_layer=cfg.per_layer)
    candidates = search_candidates(original, cfg, tp=tp, pp=pp, names=names, scores=scores)
    parse_layer_metric(cfg.layer_metric, original.num_layers, flag=names("layer_metric"))
    for cand in candidates:  # prune's meaning of layer_metric (auto: greedy for depth-only cuts, else contiguous)
        if cand.description.num_layers != original.num_layers:
            layers_to_keep(original, cand.description, cfg.layer_metric, scores.summary, scores.tensors,
                           flag=names("layer_metric"))
        parse_pairs(cfg.kd_pairs, cand.description, teacher_desc, flag=names("kd_pairs"))
        cand.description.check_layout(tp, pp)
        refusal = export_refusal(cand.description, names("per_layer")) if cand.choice is not None else None
        require(refusal is None, refusal or "")  # as prune --per-layer: only shapes the export states
    require(cfg.seq_len <= min(original.max_position_embeddings, teacher_desc.max_position_embeddings),
            f"{names('seq_len')} {cfg.seq_len} is longer than the models allow")
    require(not (teacher_logits and cfg.cache_top_k), f"--teacher-logits and {names('cache_top_k')}: give one")
    if cfg.cache_top_k is not None:
        require(cfg.cache_top_k <= teacher_desc.vocab_size, f"{names('cache_top_k')} {cfg.cache_top_k} is larger "
                                                            f"than the vocabulary ({teacher_desc.vocab_size})")
    tokenizer = load_tokenizer(checkpoint)
    corpus, heldout, eval_label = training_corpora(data, eval_data, data_opts, data_names,
                                                   vocab_size=original.vocab_size, tokenizer=tokenizer)
    if teacher_logits is not None:  # its samples are checked by each candidate's distill
        check_cache_settings(cfg, names, None)
        logit_cache.TeacherLogits.open(teacher_logits).check_settings(
            tokenizer=tokenizer_fingerprint(checkpoint), seq_len=cfg.seq_len, seed=run.seed,
            vocab_size=original.vocab_size, temperature=cfg.kd_temperature, data=corpus.blend.label,
            split=data_opts.split, names=names, data_names=data_names)
    dp = check_world_size(tp, pp)
    require(cfg.global_batch % (dp * cfg.micro_batch) == 0,
            f"{names('global_batch')} {cfg.global_batch} must be a multiple of {names('micro_batch')} "
            f"{cfg.micro_batch} x {dp} data-parallel ranks")
    out_path = Path(out)
    require(out_path.parent.exists(), f"--out '{out}': parent directory does not exist")
    check_output_dir(out_path, "--out")
    dtype = resolve_dtype(run.dtype, names("dtype"))
    run = dataclasses.replace(run, dtype=dtype.name)  # every candidate pruned, stored and trained in it
    resolved = {"checkpoint": str(checkpoint), "importance": str(importance), "teacher": teacher,
                "teacher_logits": teacher_logits, "data": corpus.blend.label, "eval_data": eval_label,
                "seed": run.seed, "dtype": run.dtype, "tp": tp, "pp": pp, **to_dict(data_opts), **to_dict(cfg)}
    if out_path.exists():
        saved_file = out_path / CONFIG_FILE
        require(saved_file.is_file() or not any(out_path.iterdir()),
                f"--out '{out}' exists and is not a search directory; choose a new path")
        saved = yaml.safe_load(saved_file.read_text()) if saved_file.is_file() else None
        check_resume(saved, resolved, what=f"the search in '{out}'", force=force, force_hint=force_hint,
                     ignore=[*resume_safe_fields(SearchConfig, DataOptions), "tp", "pp"])

    # ---- work
    init_distributed(tp, pp, run.seed)
    barrier()  # every rank has checked OUT before rank 0 writes into it (a slower rank saw a half-made OUT)
    if (out_path / RESULT).is_file():  # finished: only the clean-up may be left
        result = json.loads((out_path / RESULT).read_text())
        _finish(out_path, result, cfg.keep_all)
        log.info("search in %s is complete: best %s", out, result["best"])
        return result
    if is_rank0():
        (out_path / "candidates").mkdir(parents=True, exist_ok=True)
        tmp = out_path / f".{CONFIG_FILE}.tmp"
        tmp.write_text(yaml_text(resolved))
        tmp.replace(out_path / CONFIG_FILE)
        log_settings(log, f"search of {checkpoint}: {len(candidates)} candidates for {budget.describe(budget.limit)} "
                          f"{budget.what()}, each distilled {cfg.steps} steps on {corpus.blend.label}", resolved,
                     str(out_path / CONFIG_FILE))
        log_compute_dtype(dtype)
        log.info("search candidates:\n%s", "\n".join(
            f"  {c.name} {c.kind:9s} {c.description.num_parameters() / 1e6:.1f}M  {c.why}" for c in candidates))
    barrier()
    if cfg.cache_top_k is not None:
        teacher_logits = _write_cache(teacher, data, out_path / CACHE_DIR, cfg, run, data_opts, data_names, tp, pp,
                                      progress)

    dirs = {c.name: out_path / "candidates" / c.directory_name for c in candidates}
    for cand in candidates:
        _prune(checkpoint, importance, dirs[cand.name] / "pruned", cand, cfg, tp, pp, run)

    rungs = halving_rungs(cfg.steps, len(candidates)) if cfg.halving else [cfg.steps]
    alive = [c.name for c in candidates]
    stopped: dict[str, int] = {}
    rung_losses: dict[str, dict[int, float]] = {c.name: {} for c in candidates}
    for i, step in enumerate(rungs):
        for name in alive:
            rung_losses[name][step] = _train(teacher, teacher_logits, dirs[name], data, eval_data, cfg, step,
                                             run, data_opts, data_names, tp, pp, progress, names, force_hint,
                                             force)
        if i < len(rungs) - 1:
            keep = survivors({n: rung_losses[n][step] for n in alive}, alive)
            for name in alive:
                if name not in keep:
                    stopped[name] = step
            if is_rank0():
                log.info("search: after %d steps %s continue; %s stop", step, ", ".join(keep),
                         ", ".join(n for n in alive if n not in keep) or "none")
            alive = keep

    result = _result(original, candidates, dirs, rungs, stopped, rung_losses, cfg, resolved, budget, teacher_logits)
    if is_rank0():
        log.info("search ranking (held-out loss after %d steps, on %d samples of %s):\n%s", cfg.steps,
                 cfg.eval_samples, eval_label, format_ranking(result))
        plot_curves(result, out_path / PLOT)
        plot_layers(result, out_path / LAYERS_PLOT)
        tmp = out_path / f".{RESULT}.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out_path / RESULT)
    barrier()
    _finish(out_path, result, cfg.keep_all)
    return result


def _write_cache(teacher: str, data, path: Path, cfg: SearchConfig, run: RunConfig, data_opts, data_names: Names,
                 tp: int, pp: int, progress: bool) -> str:
    """One teacher pass over the samples the candidates train on: the training data set of
    ``steps x global_batch`` samples that each candidate's distillation reads."""
    if not (path / logit_cache.INDEX).is_file():
        logit_cache.write_teacher_logits(teacher, data, str(path), top_k=cfg.cache_top_k, seq_len=cfg.seq_len,
                             samples=cfg.steps * cfg.global_batch, micro_batch=cfg.micro_batch,
                             kd_temperature=cfg.kd_temperature, tp=tp, pp=pp, seed=run.seed, dtype=run.dtype,
                             split=data_opts.split, cache_dir=data_opts.cache_dir, data_names=data_names,
                             progress=progress)
    return str(path)


def _prune(checkpoint: str, importance: str, path: Path, cand: SearchCandidate, cfg: SearchConfig, tp: int, pp: int,
           run: RunConfig) -> None:
    if is_checkpoint(path):
        log.info("search: %s already pruned (%s)", cand.name, path)
        return
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    if cand.choice is None:
        how = dict(target=cand.target(), layer_metric=cfg.layer_metric, order="importance", refit=cfg.refit)
    else:  # prune --per-layer under the search's budget, to this choice (the optimum or an alternative)
        how = dict(target_params=cfg.target_params, layer_choice=cand.choice, refit=cfg.refit,
                   **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(PerLayerConfig)})
    prune_api.prune(checkpoint, importance, str(path), tp=tp, pp=pp, seed=run.seed, dtype=run.dtype,
                    **how)  # stored in the compute dtype


def _train(teacher: str, teacher_logits: str | None, directory: Path, data, eval_data, cfg: SearchConfig, step: int,
           run: RunConfig, data_opts, data_names: Names, tp: int, pp: int, progress: bool, names: Names,
           force_hint: str, force: bool) -> float:
    """Distil one candidate up to ``step`` of the schedule (resuming what is there) and return
    its held-out loss at that step."""
    out = directory / "distill"
    known = _heldout_at(out, step)
    finished = (out / "summary.json").is_file()
    if known is not None and (finished or step < cfg.steps):
        return known
    if out.exists() and latest_checkpoint(out) is None and not finished:
        if is_rank0():  # killed before its first checkpoint: start it again
            shutil.rmtree(out)
        barrier()
    # the stages are called through their modules (looked up at call time: tests stand in for them)
    result = distill_api.distill(None if teacher_logits else teacher, str(directory / "pruned"), list(data),
                                 str(out), cfg.distill_config(), teacher_logits=teacher_logits, eval_data=eval_data,
                                 force=force, progress=progress, names=names, force_hint=force_hint,
                                 stop_at=step if step < cfg.steps else None, tp=tp, pp=pp, seed=run.seed,
                                 dtype=run.dtype, split=data_opts.split, cache_dir=data_opts.cache_dir,
                                 data_names=data_names)
    return result.heldout_loss


def _result(original, candidates: list[SearchCandidate], dirs: dict[str, Path], rungs: list[int],
            stopped: dict[str, int], rung_losses: dict[str, dict[int, float]], cfg: SearchConfig,
            resolved: dict[str, Any], budget: Budget, teacher_logits: str | None) -> dict[str, Any]:
    finals = {c.name: rung_losses[c.name].get(cfg.steps) for c in candidates if c.name not in stopped}
    best = min(finals, key=lambda n: (finals[n], n))
    rows = []
    for cand in candidates:
        d = cand.description
        held, train = _curves(dirs[cand.name] / "distill")
        rows.append({
            "name": cand.name, "kind": cand.kind, "uniform": cand.choice is None, "source": cand.source,
            "why": cand.why, "target": cand.target(),
            "layer_shapes": [[s.num_query_groups, s.ffn_hidden_size] for s in d.layer_shapes] or None,
            "block_score": None if cand.choice is None else cand.choice.score,
            "architecture": d.to_dict(), "params": d.num_parameters(), "cost": budget.total(d),
            "flops_per_token": d.flops_per_token(budget.flops_context),
            "kv_cache_bytes_per_token": d.kv_cache_bytes_per_token(),
            "loss_after_pruning": next((loss for s, loss in held if s == 0), None),
            "rung_losses": {str(s): v for s, v in sorted(rung_losses[cand.name].items())},
            "heldout_curve": held, "train_curve": train,
            "final_loss": finals.get(cand.name), "stopped_at": stopped.get(cand.name),
            "directory": "best" if cand.name == best else f"candidates/{dirs[cand.name].name}" if cfg.keep_all
            else None,  # deleted
        })
    order = sorted(rows, key=lambda r: (r["final_loss"] is None, r["final_loss"] if r["final_loss"] is not None
                                        else r["rung_losses"][str(r["stopped_at"])], r["name"]))
    for rank, row in enumerate(order, 1):
        row["rank"] = rank
    return {"checkpoint": resolved["checkpoint"], "target_params": cfg.target_params, "budget": budget.limit,
            "budget_kind": budget.kind, "budget_text": f"{budget.describe(budget.limit)} {budget.what()}",
            "original_params": original.num_parameters(), "original_architecture": original.to_dict(),
            "steps": cfg.steps, "rungs": rungs,
            "halving": cfg.halving, "teacher_logits": teacher_logits, "flops_seq_len": budget.flops_context,
            "eval_data": resolved["eval_data"], "eval_samples": cfg.eval_samples, "seq_len": cfg.seq_len,
            "best": best, "best_directory": "best", "candidates": rows, "config": resolved}


def _finish(out: Path, result: dict[str, Any], keep_all: bool) -> None:
    """Move the winner to OUT/best and, unless ``keep_all``, delete the other candidates;
    training checkpoints (optimizer states) are deleted either way. Idempotent."""
    if is_rank0():
        best = next(r for r in result["candidates"] if r["name"] == result["best"])
        source = next((p for p in (out / "candidates").glob(f"{best['name']}-*")), None) \
            if (out / "candidates").is_dir() else None
        if source is not None and not (out / "best").exists():
            source.replace(out / "best")
        for directory in [out / "best", *sorted((out / "candidates").glob("c*"))] if (out / "candidates").is_dir() \
                else [out / "best"]:
            if directory.name != "best" and not keep_all:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                shutil.rmtree(directory / "distill" / "checkpoints", ignore_errors=True)
        if not keep_all and (out / "candidates").is_dir() and not any((out / "candidates").iterdir()):
            (out / "candidates").rmdir()
    barrier()


def format_ranking(result: dict[str, Any]) -> str:
    """The candidates as a table, best first."""
    rungs = [str(s) for s in result["rungs"][:-1]]
    head = ["rank", "name", "kind", "params", "GFLOPs/token", "KV bytes/token", "loss pruned",
            *[f"@{s}" for s in rungs], f"final @{result['steps']}", "shape"]
    rows = [head]
    for r in sorted(result["candidates"], key=lambda r: r["rank"]):
        cells = [str(r["rank"]), r["name"] + (" *" if r["name"] == result["best"] else ""), r["kind"],
                 format_count(r["params"]), f"{r['flops_per_token'] / 1e9:.3f}", f"{r['kv_cache_bytes_per_token']:,}",
                 _num(r["loss_after_pruning"]), *[_num(r["rung_losses"].get(s)) for s in rungs],
                 _num(r["final_loss"]) if r["final_loss"] is not None else f"stopped @{r['stopped_at']}",
                 shape_text(r)]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i < len(head) - 1 else c for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n(* the best: lowest held-out loss after the last step)"


def shape_text(row: dict[str, Any]) -> str:
    """A ranking row's shape in words: a uniform one's widths and depth, a per-layer one's
    K/V groups and MLP width of each layer (0: removed)."""
    if row.get("layer_shapes"):
        groups, ffn = zip(*row["layer_shapes"])
        return f"per layer: query groups {','.join(map(str, groups))}; ffn {','.join(map(str, ffn))}"
    t = row["target"]
    return f"hidden {t['hidden']}, ffn {t['ffn']}, heads {t['heads']}/{t['query_groups']}, layers {t['layers']}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot_curves(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in sorted(result["candidates"], key=lambda r: r["rank"]):
        if not r["heldout_curve"]:
            continue
        steps, losses = zip(*r["heldout_curve"])
        label = f"{r['name']} {r['kind']} {format_count(r['params'])}" + (" (best)" if r["name"] == result["best"] else "")
        ax.plot(steps, losses, "o-" if len(steps) < 30 else "-", markersize=3, label=label,
                linewidth=2.5 if r["name"] == result["best"] else 1.2)
    for s in result["rungs"][:-1]:
        ax.axvline(s, color="grey", alpha=0.4, linestyle=":")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("held-out LM loss")
    ax.set_title(f"architecture search for {result.get('budget_text') or result['target_params'] + ' parameters'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layers(result: dict[str, Any], path: Path) -> None:
    """The best per-layer candidate's K/V groups and MLP width per layer against the parent's
    (nothing when no candidate is per-layer)."""
    rows = sorted((r for r in result["candidates"] if r.get("layer_shapes")), key=lambda r: r["rank"])
    if not rows:
        return
    parent = ModelDescription.from_dict(result["original_architecture"])
    shapes = [LayerShape(g, f) for g, f in rows[0]["layer_shapes"]]
    save_figure(layer_shapes_figure(shapes, parent.num_query_groups, parent.ffn_hidden_size,
                                    f"{rows[0]['name']} (per-layer, rank {rows[0]['rank']}): widths per layer"), path)
