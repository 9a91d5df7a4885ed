"""Synthetic-data distillation: the teacher's generations as training data (prompt tokens
not trained on), cross-entropy on them, and runs that mix them with real data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import cli_in_process

# prompt and completion tokens come from disjoint id ranges, so which tokens of a sample are
# a completion's can be read off the ids alone, independently of the data code
PROMPT_IDS, COMPLETION_IDS = (10, 40), (100, 160)
EOS = 2  # the tiny models' tokenizer (tiny_models.py)


def write_completions(path: Path, count: int = 24, seed: int = 0) -> Path:
    """Records as ``generate`` writes them; every third ended at end-of-sequence (its
    ``completion_ids`` without the EOS token, which training must add)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            prompt = [rng.randrange(*PROMPT_IDS) for _ in range(rng.randint(3, 9))]
            completion = [rng.randrange(*COMPLETION_IDS) for _ in range(rng.randint(4, 12))]
            f.write(json.dumps({"index": i, "prompt": "p", "prompt_ids": prompt, "completion": "c",
                                "completion_ids": completion, "prompt_tokens": len(prompt),
                                "completion_tokens": len(completion),
                                "finish_reason": "eos" if i % 3 == 0 else "length"}) + "\n")
    return path


def trained_on(ids: torch.Tensor) -> torch.Tensor:
    """Where a token is a completion's (or the EOS ending one): what must be trained on."""
    return ((ids >= COMPLETION_IDS[0]) & (ids < COMPLETION_IDS[1])) | (ids == EOS)


def _dataset(path: Path, tokenizer, cache: Path, seq_len: int, samples: int):
    from nemo_minitron.data.dataset import check_corpus

    corpus = check_corpus([str(path)], vocab_size=1000, cache_dir=str(cache), tokenizer=tokenizer)
    assert corpus.masked
    return corpus.dataset(tokenizer, seq_len=seq_len, seed=0, num_samples=samples)


def test_completions_are_trained_on_their_completion_tokens_only(tiny_checkpoint, tmp_path, runtime):
    """Every sample's loss mask is 1 exactly on completion tokens and the EOS ending a
    completion, also where megatron-core's packing puts two records into one sample; the
    training batches carry it aligned with the labels."""
    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.distill.loader import training_batches

    tokenizer = load_tokenizer(tiny_checkpoint("llama"))
    assert tokenizer.eos_token_id == EOS
    data = _dataset(write_completions(tmp_path / "gen.jsonl"), tokenizer, tmp_path / "cache", 16, 30)
    mixed = eos = 0
    for i in range(len(data)):
        window, mask = data[i], data.loss_mask(i)
        assert torch.equal(mask.bool(), trained_on(window)), (i, window, mask)
        mixed += bool(mask.any() and not mask.all())
        eos += int((window == EOS).sum())
    assert mixed >= 10 and eos >= 3  # prompts and completions share samples; EOS tokens were added
    batch = next(training_batches(data, consumed=0, global_batch=4, micro_batch=4, dp_rank=0, dp_size=1,
                                  workers=0))
    assert torch.equal(batch["loss_mask"].bool(), trained_on(batch["labels"]))


def test_synthetic_step_is_cross_entropy_on_completions(tiny_hf, tiny_checkpoint, tmp_path, runtime):
    """method synthetic: the step's loss is the student's cross-entropy over the completion
    tokens alone (a float64 Hugging Face reference, the tokens to count read off the ids),
    and the teacher does not run."""
    from tolerances import log_softmax_sum, transformer_logits

    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.train import Trainer

    student = tiny_checkpoint("llama_small")
    desc = read_info(student).description
    cfg = DistillConfig(steps=1, global_batch=4, micro_batch=2, seq_len=16, method="synthetic",
                        synthetic_weight=0.5, logit_chunk=7)
    data = _dataset(write_completions(tmp_path / "gen.jsonl"), load_tokenizer(student), tmp_path / "cache", 16, 8)
    from nemo_minitron.distill.api import load_training_models

    model, teacher = load_training_models(str(student), None, None, desc)
    trainer = Trainer(model, None, data, None, Path("/nonexistent"), cfg, seed=0, student_desc=desc, progress=False)
    logs, _ = trainer.gradients(step=0)

    hf = load_hf_model(tiny_hf("llama_small")).double().eval()
    ce, max_logit = 0.0, 0.0
    batches = trainer.step_batches(0)
    for mb in batches:
        with torch.no_grad():
            logits = hf(mb["tokens"]).logits
        max_logit = max(max_logit, logits.abs().max().item())
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="none")
        counted = trained_on(mb["labels"]).flatten()
        assert 0 < counted.sum() < counted.numel()  # each micro-batch holds prompt tokens too
        ce += per_token[counted].mean().item() / len(batches)
    # float32 (megatron) against float64 (HF): a forward pass's rounding of the logits (width
    # 64, 3 layers), then a log-softmax over the 1,000-token vocabulary
    tol = log_softmax_sum(1000, max_logit) + 2 * transformer_logits(64, 3, torch.tensor(max_logit))
    assert abs(logs["ce_loss"] - ce) <= tol, (logs["ce_loss"], ce)
    assert abs(logs["loss"] - 0.5 * ce) <= tol  # the synthetic weight scales the objective
    assert logs["kd_loss"] == 0.0


def test_mixed_samples_hold_their_share_in_a_fixed_order():
    from nemo_minitron.distill.loader import MixedSamples

    class Source:
        def __init__(self, first: int, n: int):
            self.first, self.n = first, n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return torch.tensor([self.first + i])

        def loss_mask(self, i):
            return None

    mixed = MixedSamples(Source(0, 1000), Source(10_000, 7), 0.25, 400)
    items = [mixed.item(i) for i in range(400)]
    synthetic = [int(x["window"]) for x in items if x["synthetic"]]
    real = [int(x["window"]) for x in items if not x["synthetic"]]
    assert len(synthetic) == 100  # a quarter, in every run of 4 samples exactly one
    assert all(sum(bool(x["synthetic"]) for x in items[i:i + 4]) == 1 for i in range(0, 400, 4))
    assert real == list(range(300))  # real samples in order, none skipped or repeated
    assert synthetic == [10_000 + i % 7 for i in range(100)]  # the generations, cycled
    assert all(torch.equal(mixed.item(i)["window"], items[i]["window"]) for i in (399, 0, 123))  # order-free


def test_generate_then_distill_with_both_methods(tiny_checkpoint, tmp_path, runtime, one_thread, capsys):
    """The synthetic route end to end: the teacher generates from data prefixes, the student
    trains on its generations alone (no --data) and mixed with real data; both runs finish
    with a checkpoint and say what they trained on."""
    teacher, student = tiny_checkpoint("llama"), tiny_checkpoint("llama_small")
    gen = tmp_path / "gen.jsonl"
    code, stderr = cli_in_process(capsys, "generate", teacher, "--data", "builtin:train", "--prefix-tokens", "8",
                                  "--max-new-tokens", "8", "--limit", "8", "--temperature", "1.0", "--top-k", "50",
                                  "--out", gen)
    assert code == 0, stderr[-3000:]
    records = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(records) == 8 and all(len(r["prompt_ids"]) == 8 for r in records)
    common = ["--teacher", teacher, "--student", student, "--synthetic-data", gen, "--steps", "2",
              "--global-batch", "4", "--micro-batch", "2", "--seq-len", "12", "--eval-samples", "4"]
    for method, extra in (("synthetic", []), ("both", ["--data", "builtin:train"])):
        out = tmp_path / method
        code, stderr = cli_in_process(capsys, "distill", *common, "--method", method, *extra, "--out", out)
        assert code == 0, stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["config"]["method"] == method and summary["config"]["synthetic_data"] == str(gen)
        assert summary["config"]["data"] == ("builtin:train" if method == "both" else None)
        assert (out / "final").is_dir() and summary["final_ce_loss"] > 0
        assert (summary["final_kd_loss"] > 0) == (method == "both")  # KD on the real samples only


@pytest.mark.parametrize("case, words", [
    ("no_synthetic", ["--method synthetic", "--synthetic-data"]),
    ("synthetic_with_logits", ["--synthetic-data needs --method synthetic or both"]),
    ("blend", ["cannot be blended"]),
    ("bad_line", ["line 2", "'completion'"]),
    ("eval_completions", ["--eval-data", "training data"]),
])
def test_bad_input(tiny_checkpoint, tmp_path, capsys, case, words):
    teacher, student = str(tiny_checkpoint("llama")), str(tiny_checkpoint("llama_small"))
    gen = str(write_completions(tmp_path / "gen.jsonl", count=3))
    args = ["distill", "--teacher", teacher, "--student", student, "--out", str(tmp_path / "out"), "--steps", "1",
            "--seq-len", "16", "--data-cache", str(tmp_path / "cache")]
    if case == "no_synthetic":
        args += ["--method", "synthetic"]
    elif case == "synthetic_with_logits":
        args += ["--data", "builtin:train", "--synthetic-data", gen]
    elif case == "blend":
        args += ["--data", gen, "builtin:train"]
    elif case == "bad_line":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(Path(gen).read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "p"}) + "\n")
        args += ["--method", "synthetic", "--synthetic-data", str(bad)]
    elif case == "eval_completions":
        args += ["--data", "builtin:train", "--eval-data", gen]
    code, err = cli_in_process(capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()
