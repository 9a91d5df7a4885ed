"""Downstream evaluation: our lm-evaluation-harness LM scores as transformers does, a local
task gives lm-eval's HF model's accuracy, and the built-in tasks tell a trained model
from a random one."""

from __future__ import annotations

import json

import pytest

from conftest import cli_in_process, fast_dtype
from tiny_models import hf_continuation_logprob


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# Per token, our fp32 logits and transformers' differ by a few float32 rounding errors of
# terms of size |logit| <~ 8 summed over hidden 64: ~sqrt(64) * 8 * 6e-8 ~ 4e-6, and the
# log-softmax adds one such error. A request sums <= 64 tokens of independent errors:
# ~sqrt(64) * 8e-6 ~ 6e-5 < 1e-4.
TOL = 1e-4


def test_loglikelihoods_and_generation_equal_transformers(tiny_hf, tiny_checkpoint, runtime, one_thread):
    """Log-likelihoods (an empty context, a trailing space, an input cut to the context),
    rolling log-likelihoods over several windows and greedy generate-until: ours against
    transformers' logits, and against lm-eval's own Hugging Face model."""
    from lm_eval.models.huggingface import HFLM

    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.tasks.lm import MegatronLM

    hf_dir = tiny_hf("llama")
    opened = open_model(str(tiny_checkpoint("llama")))
    ours = MegatronLM(opened.model, opened.description, opened.tokenizer, batch_size=3, max_length=64)
    theirs = HFLM(pretrained=str(hf_dir), batch_size=3, max_length=64, device="cpu")
    pairs = [("The cat sat on the", " mat"), ("", "Hello world"), ("Ends with a space ", "here"),
             ("x" * 90, " too long for the context"), ("Return the", " number of items")]
    ll = ours.loglikelihood(_instances("loglikelihood", pairs))
    reference = theirs.loglikelihood(_instances("loglikelihood", pairs))
    assert [g for _, g in ll] == [g for _, g in reference]
    for (lp, _), (ref, _) in zip(ll, reference):
        assert abs(lp - ref) < TOL
    # independently of lm-eval: the byte tokenizer splits text at byte boundaries
    hf = load_hf_model(hf_dir)
    tok = opened.tokenizer
    for k in (0, 4):
        ctx, cont = pairs[k][0], pairs[k][1]
        expected, greedy = hf_continuation_logprob(hf, tok(ctx)["input_ids"], tok(cont)["input_ids"])
        assert abs(ll[k][0] - expected) < TOL and ll[k][1] == greedy

    texts = [("A docstring long enough to need three windows of sixty-four bytes each, " * 2,), ("short",)]
    rolling = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    for ours_lp, ref in zip(rolling, theirs.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))):
        assert abs(ours_lp - ref) < 3 * TOL  # three windows of <= 64 tokens

    gen_args = [("The quick brown", {"until": ["\n"], "max_gen_toks": 10}),
                ("x = ", {"until": ["\n", "q"], "max_gen_toks": 10})]
    assert ours.generate_until(_instances("generate_until", gen_args)) == \
        theirs.generate_until(_instances("generate_until", gen_args))


def _local_task(directory):
    """A local multiple-choice task (lm-eval YAML + JSONL data)."""
    directory.mkdir()
    rows = [{"question": f"{n} plus one is", "choices": [str(n + 1), str(n + 7), str(2 * n + 3), str(n - 5)],
             "label": 0} for n in range(24)]
    data = directory / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "arith.yaml").write_text(
        "task: local_arith\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return directory


def test_local_task_same_accuracy_as_lm_eval_hf_model(tiny_hf, tiny_checkpoint, runtime, one_thread, tmp_path,
                                                       capsys):
    """``nemo-minitron eval --tasks-path DIR`` runs a local task; lm-eval's own HF model on the
    same (exported) model gets the same accuracies."""
    from lm_eval.models.huggingface import HFLM

    from nemo_minitron.tasks.api import resolve_tasks, run_tasks

    tasks_dir = _local_task(tmp_path / "tasks")
    out = tmp_path / "eval.json"
    code, err = cli_in_process(capsys, "eval", tiny_checkpoint("llama"), "--tasks", "local_arith", "--tasks-path",
                               tasks_dir, "--micro-batch", 8, "--json", out)
    assert code == 0, err
    ours = json.loads(out.read_text())["tasks"]["local_arith"]
    theirs = run_tasks(HFLM(pretrained=str(tiny_hf("llama")), batch_size=4, device="cpu"),
                       resolve_tasks(["local_arith"], str(tasks_dir)))["local_arith"]
    assert ours["samples"] == theirs.samples == 24
    assert ours["metrics"] == pytest.approx(theirs.metrics, abs=1e-12)
    assert set(ours["metrics"]) == {"acc", "acc_norm"} and set(ours["stderr"]) == {"acc", "acc_norm"}


def test_unknown_task_is_one_line_with_close_matches(tiny_checkpoint, tmp_path, capsys):
    code, err = cli_in_process(capsys, "eval", tiny_checkpoint("llama"), "--tasks", "minitron_lastword,hellaswagg")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "unknown task 'hellaswagg'" in lines[0] and "close matches: hellaswag" in lines[0]
    code, err = cli_in_process(capsys, "eval", tiny_checkpoint("llama"), "--tasks", "minitron_nextsentense")
    assert code == 2 and "close matches: minitron_nextsentence" in err


@pytest.mark.slow
@pytest.mark.smollm2
def test_builtin_tasks_teacher_above_chance_random_model_not(smollm2, tiny_checkpoint, runtime):
    """On the first 48 examples of each built-in task, SmolLM2-135M scores more than three
    standard errors above chance; a randomly initialised model does not."""
    import torch

    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.tasks.api import resolve_tasks, run_tasks
    from nemo_minitron.tasks.builtin import CHANCE
    from nemo_minitron.tasks.lm import MegatronLM

    tasks = resolve_tasks(list(CHANCE))
    scores = {}
    for name, path, dtype in (("teacher", smollm2["checkpoint"], getattr(torch, fast_dtype())),
                              ("random", tiny_checkpoint("llama"), None)):
        opened = open_model(str(path), dtype=dtype)
        lm = MegatronLM(opened.model, opened.description, opened.tokenizer, batch_size=16)
        scores[name] = run_tasks(lm, tasks, limit=48)
    for task, chance in CHANCE.items():
        teacher, random_model = scores["teacher"][task], scores["random"][task]
        print(task, "teacher", teacher.metrics, "random", random_model.metrics)
        assert teacher.samples == random_model.samples == 48
        assert teacher.metrics["acc"] - chance > 3 * max(teacher.stderr["acc"], 0.01), (task, teacher)
        # not clearly above chance: within three standard errors of it (a floor of one
        # example in 48 where the standard error is zero)
        assert random_model.metrics["acc"] - chance <= 3 * max(random_model.stderr["acc"], 1 / 48), (task, random_model)
