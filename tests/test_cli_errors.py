"""Bad input to the foundation commands: one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import cli_in_process, run_cli


class _Result:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def cli(capsys):
    """The CLI in this process: input errors need no new interpreter (one test per command
    below still runs it as a real process)."""
    return lambda *args: _Result(*cli_in_process(capsys, *args))


def _assert_clean_error(proc, out_path, *words, before_work=True):
    """Exit 2 with one error line naming the problem; input rejected before any work starts
    prints nothing else at all."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("nemo-minitron ")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    if before_work:
        assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    if out_path is not None:
        assert not out_path.exists()
        assert not list(out_path.parent.glob(f".{out_path.name}.tmp-*"))


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    _assert_clean_error(run_cli("convert", "--hf", tmp_path / "nope", "--out", out), out, "--hf", "does not exist")


def test_unreadable_sources(cli, tmp_path):
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"not a gguf file")
    out = tmp_path / "out"
    _assert_clean_error(cli("convert", "--hf", bad_gguf, "--out", out), out, "not a GGUF file")
    bad_dir = tmp_path / "hf"
    bad_dir.mkdir()
    (bad_dir / "config.json").write_text("{ not json")
    (bad_dir / "model.safetensors").write_bytes(b"")
    _assert_clean_error(cli("convert", "--hf", bad_dir, "--out", out), out, "config.json")


def test_pickle_weights_are_refused(cli, tiny_hf, tmp_path):
    src = tmp_path / "bin_only"
    shutil.copytree(tiny_hf("llama"), src)
    for f in src.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    out = tmp_path / "out"
    _assert_clean_error(cli("convert", "--hf", src, "--out", out), out, "safetensors")


def test_unsupported_architecture(cli, tiny_hf, tmp_path):
    src = tmp_path / "gpt2_like"
    shutil.copytree(tiny_hf("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _assert_clean_error(cli("convert", "--hf", src, "--out", out), out, "unsupported architecture", "gpt2")


def test_tp_must_divide_heads_and_groups(cli, tiny_hf, tmp_path):
    out = tmp_path / "out"
    proc = cli("convert", "--hf", tiny_hf("llama"), "--out", out, "--tp", "3")
    _assert_clean_error(proc, out, "--tp 3", "allowed --tp values: 1, 2")


def test_existing_output_is_never_touched(cli, tiny_hf, tiny_checkpoint, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cli("convert", "--hf", tiny_hf("llama"), "--out", out)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    proc = cli("export", tiny_checkpoint("llama"), "--hf-out", out)
    assert proc.returncode == 2 and "--hf-out" in proc.stderr and "already exists" in proc.stderr


def test_failure_after_start_leaves_nothing(tiny_hf, tmp_path):
    """A source whose weights do not match its config fails during loading: no output, no temp dir."""
    src = tmp_path / "truncated"
    shutil.copytree(tiny_hf("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] += 1  # the weights hold one layer fewer
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _assert_clean_error(run_cli("convert", "--hf", src, "--out", out), out, "model.layers.4", before_work=False)


def test_not_a_checkpoint(cli, tmp_path):
    out = tmp_path / "hf"
    _assert_clean_error(cli("export", tmp_path, "--hf-out", out), out, "not a nemo-minitron checkpoint")


@pytest.mark.parametrize("flags, words", [
    (["--data", "missing.txt"], ["--data", "does not exist"]),
    (["--data", "builtin:nope"], ["builtin:calib"]),
    (["--data", "builtin:heldout", "--seq-len", "0"], ["--seq-len"]),
])
def test_eval_bad_data(cli, tiny_checkpoint, tmp_path, flags, words):
    proc = cli("eval", tiny_checkpoint("llama"), *flags)
    _assert_clean_error(proc, None, *words)


def test_help_shows_defaults_choices_examples_and_version(capsys):
    from nemo_minitron import __version__
    from nemo_minitron.cli import main
    from nemo_minitron.importance.config import ImportanceConfig

    assert main(["--version"]) == 0 and __version__ in capsys.readouterr().out
    assert main(["importance", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    # the defaults shown are the config dataclass's, choices come from its Literal types
    assert f"[default: {ImportanceConfig().samples}]" in text and "{mean,l2,var}" in text
    assert "example: nemo-minitron importance" in text
    assert main(["--help"]) == 0 and "examples:" in capsys.readouterr().out


def test_plan_needs_only_the_config(cli, tiny_hf, tmp_path, capsys):
    """Planning reads shapes only: a Hugging Face directory holding just config.json will do."""
    only_config = tmp_path / "config_only"
    only_config.mkdir()
    shutil.copy(tiny_hf("llama") / "config.json", only_config)
    from nemo_minitron.cli import main

    assert main(["plan", str(only_config), "--target-params", "200K"]) == 0
    assert "budget 200K parameters" in capsys.readouterr().out


def test_a_training_directory_names_its_model(cli, tiny_checkpoint, tmp_path):
    run = tmp_path / "distill"
    shutil.copytree(tiny_checkpoint("llama"), run / "final")
    (run / "metrics.jsonl").write_text("")
    proc = cli("eval", run, "--data", "builtin:heldout", "--seq-len", "16")
    _assert_clean_error(proc, None, "is a training output directory", f"its model is '{run / 'final'}'")


def _recipe(path, source, output_dir):
    path.write_text(f"model: {{source: '{source}'}}\noutput_dir: '{output_dir}'\n"
                    "data: {calib: [builtin:calib], train: [builtin:train], heldout: [builtin:heldout]}\n"
                    "rounds: [{prune: {target: {layers: 3}}}]\n")
    return path


def test_outputs_in_a_read_only_directory(cli, tiny_checkpoint, tiny_hf, tmp_path, read_only_dir):
    """Every command that writes checks, before any work, that it can: one line naming the
    flag (no traceback from deep inside the stage), nothing written."""
    ckpt, ro = tiny_checkpoint("llama"), read_only_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n")
    cases = [
        (["convert", "--hf", tiny_hf("llama"), "--out", ro / "converted"], "--out"),
        (["export", ckpt, "--hf-out", ro / "hf"], "--hf-out"),
        (["export", ckpt, "--megatron-out", ro / "megatron"], "--megatron-out"),
        (["importance", ckpt, "--data", "builtin:calib", "--out", ro / "imp", "--seq-len", "16"], "--out"),
        (["prune", ckpt, "--importance", tmp_path, "--out", ro / "pruned", "--target", "layers=3"], "--out"),
        (["distill", "--teacher", ckpt, "--student", ckpt, "--data", "builtin:train", "--out", ro / "distill"],
         "--out"),
        (["teacher-logits", "--teacher", ckpt, "--data", "builtin:train", "--out", ro / "logits"], "--out"),
        (["search", ckpt, "--importance", tmp_path, "--target-params", "200K", "--data", "builtin:train",
          "--out", ro / "search"], "--out"),
        (["generate", ckpt, "--prompts", prompts, "--out", ro / "out.jsonl"], "--out"),
        (["eval", ckpt, "--data", "builtin:heldout", "--json", ro / "eval.json"], "--json"),
        (["plan", ckpt, "--target-params", "200K", "--json", ro / "plan.json"], "--json"),
        (["preprocess", "--input", "builtin:docs", "--model", ckpt, "--out", ro / "corpus"], "--out"),
        (["run", _recipe(tmp_path / "recipe.yaml", ckpt, ro / "run")], "output_dir"),
    ]
    for args, flag in cases:
        _assert_clean_error(cli(*args), None, flag, "cannot write in", str(ro))
    assert list(ro.iterdir()) == []


@pytest.fixture
def incomplete_checkpoint(tiny_checkpoint, tmp_path):
    """Factory: a copy of the tiny checkpoint with one file of its weights removed."""
    def make(removed: str):
        broken = tmp_path / f"without_{removed.strip('_.')}"
        shutil.copytree(tiny_checkpoint("llama"), broken)
        victim = sorted((broken / "weights").glob(removed))[-1]
        victim.unlink()
        return broken, victim.name
    return make


def test_incomplete_checkpoint_is_refused_by_every_reader(cli, tiny_checkpoint, incomplete_checkpoint, tmp_path):
    """A checkpoint missing a shard (or its common state) is one line naming the file, from
    every command that loads weights, before any work."""
    good = tiny_checkpoint("llama")
    broken, shard = incomplete_checkpoint("*.distcp")
    out = tmp_path / "out"
    cases = [
        ["eval", broken, "--data", "builtin:heldout"],
        ["distill", "--teacher", good, "--student", broken, "--data", "builtin:train", "--out", out],
        ["distill", "--teacher", broken, "--student", good, "--data", "builtin:train", "--out", out],
        ["export", broken, "--hf-out", out],
        ["importance", broken, "--data", "builtin:calib", "--out", out],
        ["prune", broken, "--importance", tmp_path, "--out", out, "--target", "layers=3"],
        ["teacher-logits", "--teacher", broken, "--data", "builtin:train", "--out", out],
        ["search", broken, "--importance", tmp_path, "--target-params", "200K", "--data", "builtin:train",
         "--out", out],
        ["generate", broken, "--prompts", tmp_path, "--out", out],
        ["run", _recipe(tmp_path / "recipe.yaml", broken, out)],
    ]
    for args in cases:
        _assert_clean_error(cli(*args), out, "is incomplete", shard)
    if (good / "weights" / "common.pt").is_file():  # megatron-core 0.16 (0.17 on: inside the shards)
        no_common, _ = incomplete_checkpoint("common.pt")
        _assert_clean_error(cli("eval", no_common, "--data", "builtin:heldout"), None, "is incomplete", "common.pt")
    # a Megatron-LM layout: the iteration directory is the torch_dist directory
    root = tmp_path / "megatron"
    shutil.copytree(broken / "weights", root / "iter_0000010")
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    _assert_clean_error(cli("convert", "--megatron", root, "--out", out), out, "--megatron", "is incomplete", shard)


def test_bad_paths_are_refused_before_torch_is_imported(tiny_checkpoint, incomplete_checkpoint, tmp_path):
    """The handlers check checkpoint paths themselves, before importing their stage (which
    takes seconds): no torch in the process after these errors."""
    import subprocess
    import sys

    broken, _ = incomplete_checkpoint("*.distcp")
    missing, out = tmp_path / "missing", tmp_path / "out"
    commands = [
        ["importance", missing, "--data", "builtin:calib", "--out", out],
        ["export", missing, "--hf-out", out],
        ["eval", missing, "--data", "builtin:heldout"],
        ["prune", broken, "--importance", tmp_path, "--out", out, "--target", "layers=3"],
        ["eval", broken, "--data", "builtin:heldout"],
        ["distill", "--teacher", broken, "--student", broken, "--data", "builtin:train", "--out", out],
        ["importance", tiny_checkpoint("llama"), "--data", "builtin:calib", "--out", tmp_path],
    ]
    script = ("import json, sys\nfrom nemo_minitron.cli import main\n"
              f"codes = [main(args) for args in {[[str(a) for a in c] for c in commands]!r}]\n"
              "print(json.dumps([codes, [m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules]]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).parent.parent))
    codes, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(commands), proc.stderr
    assert imported == [], proc.stderr


def _subcommands():
    import argparse

    from nemo_minitron.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_flag_has_help_its_default_and_a_meaningful_placeholder():
    """Walk every subcommand's flags: help text, the default shown (on/off for the --x/--no-x
    pairs), required ones marked, and no placeholder that is a raw field name (LAYER_SAMPLES)."""
    import argparse
    import re

    checked = 0
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            where = f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
            text = " ".join((action.help or "").split())
            assert text and text != "[required]", f"{where}: no help"
            if isinstance(action, argparse.BooleanOptionalAction):
                shown = "auto" if action.default is None else "on" if action.default else "off"
                assert f"[default: {shown}]" in text, f"{where}: {text}"
            elif action.option_strings and action.default not in (None, False, [], {}):
                assert f"[default: {action.default}]" in text or "[default: " in text, f"{where}: {text}"
            if action.required and action.option_strings:
                assert text.endswith("[required]"), f"{where}: {text}"
            takes_value = action.nargs != 0 and not action.choices
            if takes_value:
                metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
                assert not re.fullmatch(r"[A-Z0-9]+(_[A-Z0-9]+)+", str(metavar)), f"{where}: {metavar}"
            checked += 1
    assert checked > 200  # every command's flags were walked


def test_help_says_what_is_required_and_what_the_seed_does():
    commands = _subcommands()

    def help_of(command, flag):
        action = next(a for a in commands[command]._actions if flag in a.option_strings)
        return " ".join(action.help.split())

    assert help_of("distill", "--teacher").endswith("[required unless --teacher-logits]")
    assert help_of("search", "--target-params").endswith("[required unless --per-layer with --target-active-params, "
                                                         "--target-memory or --target-flops]")
    assert help_of("convert", "--hf").endswith("[required: --hf or --megatron]")
    for command in ("convert", "export"):  # they draw no random numbers
        assert not any("--seed" in a.option_strings for a in commands[command]._actions)
    assert "calibration samples" in help_of("importance", "--seed")
    assert "--order random" in help_of("prune", "--seed")


def test_a_bad_flag_value_names_the_flag_once(cli, tmp_path):
    proc = cli("prune", tmp_path, "--importance", tmp_path, "--out", tmp_path / "out", "--target", "width=3")
    _assert_clean_error(proc, tmp_path / "out", "error: --target: unknown axis 'width'")
    assert proc.stderr.count("--target") == 1


def test_settings_are_one_line_at_info_and_whole_at_debug(cli, tiny_checkpoint, tmp_path, caplog):
    """The resolved settings: one line at info (what runs on what, where they all are), the
    YAML only at debug; NEMO_MINITRON_LOG_LEVEL=debug turns debug on."""
    import logging
    import subprocess
    import sys

    ckpt, record = tiny_checkpoint("llama"), tmp_path / "eval.json"
    with caplog.at_level(logging.DEBUG, logger="nemo_minitron"):
        proc = cli("eval", ckpt, "--data", "builtin:heldout", "--seq-len", "16", "--max-tokens", "64",
                   "--json", record)
    assert proc.returncode == 0, proc.stderr
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    summary = [m for m in info if m.startswith("eval of ")]
    assert summary == [f"eval of {ckpt}: held-out loss on builtin:heldout (16 tokens per sample); all settings: "
                       f"{record}"]
    assert not [m for m in info if "\n" in m and "seq_len:" in m]  # no YAML at info
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.startswith("resolved settings:\n") and "\nseq_len: 16\n" in m for m in debug), debug
    assert json.loads(record.read_text())["seq_len"] == 16
    script = ("import logging, os\nos.environ['NEMO_MINITRON_LOG_LEVEL'] = 'debug'\n"
              "from nemo_minitron.runtime.distributed import setup_logging\nsetup_logging(0)\n"
              "print(logging.getLogger('nemo_minitron').getEffectiveLevel())")
    level = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           cwd=str(Path(__file__).parent.parent)).stdout.strip()
    assert level == str(logging.DEBUG)
