"""The teacher-logit cache: what it stores, distillation from it against the live teacher
at TP=1, TP=2 and PP=2, caches written at one layout and read at another, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import cli_in_process, run_workers

SEED = 5
SAMPLES = 16      # the cache covers the first 16 training samples
SEQ_LEN = 16
T = 2.0           # the cache is written, and the student trained, at temperature 2
VOCAB = 1000      # tiny_models.TINY_VOCAB
WIDTH, LAYERS = 96, 4  # the teacher's largest inner dimension and depth (tiny_models.py)
SETTINGS = dict(global_batch=4, micro_batch=2, seq_len=SEQ_LEN, lr=1e-3, kd_temperature=T, ce_weight=0.25,
                logit_chunk=7)


def write_corpus(path: Path) -> str:
    """A small text file (6,000 characters of the built-in training split): about 350
    samples of 16 bytes, tokenised in no time."""
    from nemo_minitron.data.builtin import builtin_documents

    text, docs = "", iter(builtin_documents("train"))
    while len(text) < 6000:
        text += next(docs) + "\n\n"
    path.write_text(text[:6000])
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "train.txt")


def write_cache(teacher, data: str, out, top_k: int, tp: int = 1, pp: int = 1, value_dtype: str = "float32") -> Path:
    from nemo_minitron.distill.teacher_logits import write_teacher_logits

    return write_teacher_logits(str(teacher), [data], str(out), top_k=top_k, samples=SAMPLES,
                                seq_len=SEQ_LEN, kd_temperature=T, value_dtype=value_dtype, micro_batch=4, tp=tp,
                                pp=pp, seed=SEED, progress=False)


def first_samples(checkpoint, data: str, count: int = SAMPLES, seed: int = SEED) -> torch.Tensor:
    """The training data set a distillation of ``count`` samples reads (what a cache of
    ``samples=count`` holds), through megatron-core's GPTDataset."""
    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.data.dataset import check_corpus

    return check_corpus([data], vocab_size=VOCAB).dataset(load_tokenizer(checkpoint), seq_len=SEQ_LEN, seed=seed,
                                                          part="train", num_samples=count).take()


def make_trainer(teacher, student, data: str, tp: int, pp: int, cache=None):
    """A trainer at a layout on the samples a cache covers, taught by the live teacher or by
    the cache ``cache`` (any rank)."""
    from nemo_minitron.checkpoint.store import load_checkpoint, read_info
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.teacher_logits import TeacherLogits
    from nemo_minitron.distill.train import Trainer
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(tp, pp, SEED)
    s_model, s_info = load_checkpoint(student)
    t_model = None if cache is not None else load_checkpoint(teacher)[0]
    return Trainer(s_model, t_model, first_samples(student, data), None, Path("/nonexistent"),
                   DistillConfig(steps=1, **SETTINGS), seed=SEED, student_desc=s_info.description,
                   teacher_desc=read_info(teacher).description, progress=False,
                   teacher_logits=TeacherLogits.open(cache) if cache is not None else None)


def one_step(teacher, student, data: str, tp: int, pp: int, cache=None) -> dict:
    """Losses and full gradients of one forward-backward pass (this rank's stage)."""
    logs, grads = make_trainer(teacher, student, data, tp, pp, cache).gradients(step=0)
    return {"logs": logs, "grads": grads}


def teacher_log_probs(teacher, samples, temperature: float = T) -> tuple[torch.Tensor, float]:
    """log softmax(y / T) of the teacher's full float32 logits, in float64: [n, s, V]; and max |y|."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits

    logits = full_logits(open_model(str(teacher)).model, samples[:, :-1], VOCAB).double()
    return (logits / temperature).log_softmax(-1), logits.abs().max().item()


def content_tolerance(max_logit: float, temperature: float = T) -> float:
    """The cache's teacher forward (micro-batches of 4) against full_logits' (of 1): the logits
    differ by a forward pass's rounding (divided by T); the log-softmax adds its own."""
    from tolerances import log_softmax_sum, transformer_logits

    return transformer_logits(WIDTH, LAYERS, torch.tensor(max_logit)) * 2 / temperature + \
        log_softmax_sum(VOCAB, max_logit / temperature)


def check_contents(cache_dir: Path, ref: torch.Tensor, tol: float, rel: float = 0.0) -> None:
    """The cache holds, per token of every sample, the K largest teacher log-probabilities
    (most probable first) and the log of the rest of the mass, against a float64 reference
    (``rel``: the stored values' rounding, relative)."""
    from nemo_minitron.distill.teacher_logits import TeacherLogits

    cache = TeacherLogits.open(cache_dir)
    n = len(ref)
    got = cache.read(torch.arange(n))
    k = cache.top_k
    assert cache.num_samples == n and got.ids.shape == (n, SEQ_LEN, k) and got.log_rest.shape == (n, SEQ_LEN)
    assert (got.log_probs[..., 1:] <= got.log_probs[..., :-1]).all()
    at_ids = ref.gather(-1, got.ids)
    assert ((got.log_probs.double() - at_ids).abs() <= tol + rel * at_ids.abs()).all()
    outside = ref.scatter(-1, got.ids, float("-inf"))
    # the K-th cached entry is at least every entry left out (up to the rounding)
    assert (outside.max(-1).values - at_ids[..., -1]).max().item() <= 2 * tol
    rest = outside.logsumexp(-1)
    if k == VOCAB:
        assert torch.isneginf(got.log_rest).all()
    else:
        assert (got.log_rest.double() - rest).abs().max().item() <= tol


def bucket_reference(z: torch.Tensor, ref_log_q: torch.Tensor, k: int) -> torch.Tensor:
    """Forward KL (times T^2) per token over the teacher's top-k and one bucket for the rest,
    written out in float64 from full logits: z the student's logits, ref_log_q the teacher's
    log-probabilities at T."""
    log_p = (z.double() / T).log_softmax(-1)
    top = ref_log_q.topk(k, dim=-1)
    in_top = torch.zeros_like(ref_log_q, dtype=torch.bool).scatter(-1, top.indices, True)
    log_q_rest = ref_log_q.masked_fill(in_top, float("-inf")).logsumexp(-1)
    log_p_rest = log_p.masked_fill(in_top, float("-inf")).logsumexp(-1)
    kl = (top.values.exp() * (top.values - log_p.gather(-1, top.indices))).sum(-1) \
        + log_q_rest.exp() * (log_q_rest - log_p_rest)
    return T * T * kl


# another split of the same float32 arithmetic (vocabulary shards, row-parallel sums, or the
# teacher's log-probabilities computed once and stored): per-token log-softmax sums over the
# vocabulary (T^2 KL); gradients are sums over the step's 64 tokens of products through the
# layers, as in test_distill's layout comparison
def assert_same(a: dict, b: dict, what: str) -> None:
    from tolerances import fp32, log_softmax_sum

    loss_tol = log_softmax_sum(VOCAB, 10.0) * T * T
    for key in ("loss", "kd_loss", "ce_loss"):
        assert abs(a["logs"][key] - b["logs"][key]) <= loss_tol, (what, key, a["logs"][key], b["logs"][key])
    assert a["grads"].keys() == b["grads"].keys(), what
    for key, want in b["grads"].items():
        tol = fp32(64 * WIDTH * (2 * LAYERS + 1), want.abs().max().item())
        assert (a["grads"][key] - want).abs().max().item() <= tol, (what, key)


@pytest.fixture(scope="module")
def tp1(tiny_checkpoint, corpus, tmp_path_factory):
    """At TP=1: caches with K = the vocabulary and K = 8, the teacher's float64 reference
    log-probabilities on the samples they cover (and its largest logit), and one step
    distilled from the live teacher."""
    root = tmp_path_factory.mktemp("tp1_caches")
    teacher, student = tiny_checkpoint("llama"), tiny_checkpoint("llama_small")
    ref, max_logit = teacher_log_probs(teacher, first_samples(teacher, corpus))
    assert max_logit < 10  # the bound the layout tolerances assume
    return {"teacher": teacher, "student": student, "full": write_cache(teacher, corpus, root / "full", VOCAB),
            "top8": write_cache(teacher, corpus, root / "top8", 8), "ref": ref, "max_logit": max_logit,
            "live": one_step(teacher, student, corpus, 1, 1)}


@pytest.fixture(scope="module")
def layouts(tp1, corpus, tmp_path_factory):
    """One 2-process run: a K = vocabulary cache written at TP=2 (``cache-tp2``); a step from
    the live teacher and one from that cache at TP=2 and at PP=2 (``tp2/``, ``pp2/``:
    rank files); a K = 8 cache written at DP=2 (``cache-dp2``)."""
    out = tmp_path_factory.mktemp("teacher_logits_layouts") / "out"
    run_workers("teacher_logits_layouts.py", tp1["teacher"], tp1["student"], corpus, out, out=out)
    steps = {}
    for layout in ("tp2", "pp2"):
        parts = [torch.load(p) for p in sorted((out / layout).glob("rank*.pt"))]
        assert len(parts) == 2, layout
        steps[layout] = {kind: {"logs": parts[-1][kind]["logs"],  # losses: every rank has them
                                "grads": {k: v for p in parts for k, v in p[kind]["grads"].items()}}
                         for kind in ("live", "cached")}
    return {"out": out, "steps": steps}


def test_the_cache_holds_the_top_k_log_probabilities_and_the_rest(tp1):
    """Written at TP=1, with K = the vocabulary and K = 8: the teacher's largest K
    log-probabilities at T, most probable first, and the log of the rest of the mass."""
    tol = content_tolerance(tp1["max_logit"])
    check_contents(tp1["full"], tp1["ref"], tol)
    check_contents(tp1["top8"], tp1["ref"], tol)


def test_a_full_cache_trains_as_the_live_teacher(tp1, corpus):
    live = tp1["live"]
    assert_same(one_step(tp1["teacher"], tp1["student"], corpus, 1, 1, tp1["full"]), live,
                "TP=1: cache (K = vocabulary) vs live")
    assert live["logs"]["kd_loss"] > 0.01  # the student is not the teacher: the comparison has content


def test_a_top_8_cache_trains_on_the_top_8_and_a_bucket_for_the_rest(tp1, corpus):
    """With K = 8 the step's KD loss is the top-8 + bucket KL computed independently from
    both models' full logits, and not the live teacher's loss."""
    from tolerances import log_softmax_sum, transformer_logits

    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits

    trainer = make_trainer(tp1["teacher"], tp1["student"], corpus, 1, 1, tp1["top8"])
    logs, _ = trainer.gradients(step=0)
    s_model = open_model(str(tp1["student"])).model
    kd, ce = [], []
    for mb in trainer.step_batches(0):
        z = full_logits(s_model, mb["tokens"], VOCAB).double()
        y_log_q = tp1["ref"][mb["index"]]
        kd.append(bucket_reference(z, y_log_q, 8).mean())
        ce.append(torch.nn.functional.cross_entropy(z.flatten(0, 1), mb["labels"].flatten()))
    want_kd, want_ce = torch.stack(kd).mean().item(), torch.stack(ce).mean().item()
    # float32 (training forward, float32 cache) against float64 from the same float32 logits: a
    # log-softmax sum over the vocabulary, plus the student logits' rounding (KL moves by at most
    # 2 T per unit of logit error) between the training forward and full_logits
    max_logit = tp1["max_logit"]
    tol = T * T * log_softmax_sum(VOCAB, max_logit / T) + 2 * T * transformer_logits(WIDTH, LAYERS,
                                                                                      torch.tensor(max_logit))
    assert abs(logs["kd_loss"] - want_kd) <= tol, (logs["kd_loss"], want_kd)
    assert abs(logs["loss"] - (want_kd + 0.25 * want_ce)) <= 2 * tol
    # the bucket is what makes K = 8 differ from the full KL: it is not the live loss
    assert abs(logs["kd_loss"] - tp1["live"]["logs"]["kd_loss"]) > 100 * tol


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_a_cache_written_at_tp2_trains_as_the_live_teacher_at_tp2_and_pp2(layouts, layout):
    steps = layouts["steps"][layout]
    assert_same(steps["cached"], steps["live"], f"{layout}: cache written at TP=2 vs live")


@pytest.mark.multirank
def test_a_cache_written_at_tp2_is_read_at_tp1(tp1, layouts, corpus):
    """The cache written at TP=2 says so, holds what a TP=1 cache holds, and trains at TP=1
    as the live teacher and as at PP=2."""
    tp2_cache = layouts["out"] / "cache-tp2"
    assert json.loads((tp2_cache / "index.json").read_text())["written_at"] == {"tp": 2, "pp": 1, "dp": 1}
    check_contents(tp2_cache, tp1["ref"], content_tolerance(tp1["max_logit"]))
    at_tp1 = one_step(tp1["teacher"], tp1["student"], corpus, 1, 1, tp2_cache)
    assert_same(at_tp1, tp1["live"], "TP=1: cache written at TP=2 vs live")
    assert_same(layouts["steps"]["pp2"]["cached"], at_tp1, "cache written at TP=2: PP=2 vs TP=1")


@pytest.mark.multirank
def test_a_cache_written_at_dp2_has_a_shard_per_rank_read_by_sample_index(tp1, layouts):
    dp2 = layouts["out"] / "cache-dp2"
    assert [s["count"] for s in json.loads((dp2 / "index.json").read_text())["shards"]] == [8, 8]
    check_contents(dp2, tp1["ref"], content_tolerance(tp1["max_logit"]))


def test_bf16_cache_and_reading_by_index(tiny_checkpoint, corpus, small_cache, runtime):
    """A bf16 cache holds the teacher's top-K log-probabilities rounded to bf16 (2^-8
    relative) and the rest of the mass; any sample indices read back their own rows; the files
    hold the arrays and nothing more."""
    from nemo_minitron.distill.teacher_logits import TeacherLogits, bytes_per_token

    from nemo_minitron.runtime.config import DEFAULT_SEED

    teacher = tiny_checkpoint("llama")
    ref, max_logit = teacher_log_probs(teacher, first_samples(teacher, corpus, 8, DEFAULT_SEED), temperature=1.0)
    check_contents(small_cache, ref, content_tolerance(max_logit, 1.0), rel=2.0 ** -8)
    cache = TeacherLogits.open(small_cache)
    every, some = cache.read(torch.arange(8)), cache.read([5, 0, 7])
    for field in ("ids", "log_probs", "log_rest"):
        assert torch.equal(getattr(some, field), getattr(every, field)[[5, 0, 7]])
    # per token K ids (4 bytes), K values (2 bytes) and the rest (4 bytes); per sample a hash;
    # four .npy headers of at most 128 bytes
    size = sum(f.stat().st_size for f in Path(small_cache).glob("*.npy"))
    assert bytes_per_token(4, "bfloat16") == 4 * 6 + 4
    assert 0 <= size - 8 * SEQ_LEN * bytes_per_token(4, "bfloat16") - 8 * 8 <= 4 * 128


@pytest.fixture(scope="module")
def small_cache(tiny_checkpoint, corpus, tmp_path_factory):
    from nemo_minitron.distill.teacher_logits import write_teacher_logits

    out = tmp_path_factory.mktemp("small_cache") / "cache"
    return write_teacher_logits(str(tiny_checkpoint("llama")), [corpus], str(out), top_k=4, samples=8,
                                seq_len=SEQ_LEN, progress=False)


@pytest.mark.parametrize("case, words", [
    ("tokenizer", ["--teacher-logits", "another tokenizer"]),
    ("seq_len", ["--teacher-logits", "--seq-len 16, not --seq-len 32"]),
    ("data", ["--teacher-logits", "was written for other data", "not --data"]),
    ("rewritten", ["--teacher-logits", "was written for other data", "sample 0 and 7 more of those checked differ"]),
    ("split", ["--teacher-logits", "was written for --split None, not --split 90,10,0"]),
    ("temperature", ["temperature 1, not --kd-temperature 2"]),
    ("pairs", ["--teacher-logits with --kd-pairs", "live teacher"]),
    ("contrastive", ["--teacher-logits with --contrastive-weight", "whole distributions"]),
    ("both", ["--teacher or --teacher-logits, not both"]),
    ("top_k_too_large", ["--top-k 1001 is larger than the vocabulary (1000)"]),
])
def test_bad_input(tiny_checkpoint, corpus, small_cache, tmp_path, capsys, case, words):
    from test_distill import _with_other_tokenizer

    student = tiny_checkpoint("llama_small")
    out = tmp_path / "out"
    flags = ["--steps", "2", "--seq-len", str(SEQ_LEN), "--global-batch", "2", "--micro-batch", "2",
             "--eval-data", "builtin:heldout"]  # the corpus is not built-in: held-out data is asked for
    data, small = corpus, small_cache
    if case == "top_k_too_large":
        code, stderr = cli_in_process(capsys, "teacher-logits", "--teacher", tiny_checkpoint("llama"), "--data",
                                      corpus, "--top-k", "1001", "--seq-len", "16", "--out", out)
    else:
        if case == "tokenizer":
            student = _with_other_tokenizer(student, tmp_path)
        elif case == "seq_len":
            flags[flags.index("--seq-len") + 1] = "32"
        elif case == "data":
            data = write_corpus(tmp_path / "other.txt")
        elif case == "rewritten":  # the same file name and settings, other text: caught by the samples' hashes
            from nemo_minitron.distill.teacher_logits import write_teacher_logits

            data = write_corpus(tmp_path / "train.txt")
            small = write_teacher_logits(tiny_checkpoint("llama"), [data], str(tmp_path / "cache"), top_k=4,
                                         samples=8, seq_len=SEQ_LEN, progress=False)
            Path(data).write_text(Path(data).read_text()[::-1])
        elif case == "split":
            flags += ["--split", "90,10,0"]
        elif case == "temperature":
            flags += ["--kd-temperature", "2"]
        elif case == "pairs":
            flags += ["--kd-pairs", "0:1"]
        elif case == "contrastive":
            flags += ["--contrastive-weight", "0.5"]
        elif case == "both":
            flags += ["--teacher", tiny_checkpoint("llama")]
        code, stderr = cli_in_process(capsys, "distill", "--teacher-logits", small, "--student", student,
                                      "--data", data, "--out", out, *flags)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert all(w in stderr for w in words), stderr
    assert not out.exists()


def test_cached_distillation_without_a_teacher(tiny_checkpoint, corpus, small_cache, tmp_path, runtime):
    """``distill`` from a cache runs no teacher and records which cache taught the student."""
    from nemo_minitron.distill.api import distill

    out = tmp_path / "d"
    summary = distill(None, str(tiny_checkpoint("llama_small")), [corpus], str(out), eval_data=["builtin:heldout"],
                      teacher_logits=str(small_cache), steps=2, global_batch=2, micro_batch=2, seq_len=SEQ_LEN,
                      eval_samples=2, progress=False).summary
    assert summary["teacher"] is None and summary["teacher_logits"] == str(small_cache)
    assert summary["teacher_eval"] is None and math.isfinite(summary["final_kd_loss"])
    assert summary["config"]["teacher_logits_id"] and (out / "final" / "nemo_minitron.json").is_file()
