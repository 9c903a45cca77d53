"""`dialogbot train` on the tiny random-weight model: memorisation through `dialogbot chat`,
resume after a stop, Ctrl-C, data-parallel under torchrun, and one line for each bad input."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "dialogbot"
EXCHANGES = [
    ("Where are we going today?", "To a planet made of pickles."),
    ("What is your favourite colour?", "Portal green obviously."),
    ("Can I drive the ship?", "Not until you grow up."),
    ("Why do you drink so much?", "Science makes me thirsty."),
    ("Is mom going to be mad?", "Your mother is always mad."),
    ("Who built the portal gun?", "I built it in a garage."),
]


def script(folder: Path) -> Path:
    path = folder / "script.csv"
    rows = ["name,line"] + [f"{who},{text}" for question, answer in EXCHANGES
                            for who, text in (("Morty", question), ("Rick", answer))]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def env(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGBOT_")}
    base.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return base


def run(args, env, cwd, stdin="", timeout=300):
    return subprocess.run([str(BIN), *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def chat_replies(model: Path, env, tmp_path) -> list[str]:
    """Each trained context said to `dialogbot chat` in a fresh conversation, greedy."""
    chat_env = dict(env, DIALOGBOT_MODEL=str(model), DIALOGBOT_DO_SAMPLE="false",
                    DIALOGBOT_MAX_NEW_TOKENS="16", DIALOGBOT_TORCH_THREADS="1",
                    DIALOGBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/{model.name}.db")
    said = "\n/reset\n".join(question for question, _ in EXCHANGES) + "\n"
    result = run(["chat"], chat_env, tmp_path, said)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[::2]  # every other line answers a /reset


def test_trained_character_answers_its_lines_through_chat_and_the_base_does_not(
        tmp_path, env, tiny_model_dir):
    out = tmp_path / "models" / "rick"
    result = run(["train", str(script(tmp_path)), "--character", "Rick", "--context-lines", "1",
                  "--base", str(tiny_model_dir), "--out", str(out), "--lr", "1e-3",
                  "--batch-size", "1", "--max-steps", "300", "--eval-fraction", "0"],
                 env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 examples" in result.stdout and f"model written to {out}" in result.stdout
    assert not out.with_name("rick.partial").exists()

    wanted = [answer for _, answer in EXCHANGES]
    trained = chat_replies(out, env, tmp_path)
    assert len(trained) == 6
    assert sum(got == want for got, want in zip(trained, wanted)) >= 5, trained
    base = chat_replies(tiny_model_dir, env, tmp_path)
    assert sum(got == want for got, want in zip(base, wanted)) == 0, base

    card = (out / "README.md").read_text()
    summary = json.loads((out / "dialogbot-training.json").read_text())
    assert f"base_model: {tiny_model_dir}" in card and summary["data_sha256"] in card
    assert summary["examples"]["train"] == 6 and summary["steps"] == 300
    assert summary["settings"]["lr"] == 1e-3 and summary["settings"]["character"] == "Rick"


def test_perplexity_before_and_after_printed_and_saved(tmp_path, tiny_model_dir):
    from bot.train import TrainOptions, train

    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"{q}\n{a}" for q, a in EXCHANGES * 2) + "\n")
    lines: list[str] = []
    result = train(TrainOptions(data=data, out=tmp_path / "m", base=str(tiny_model_dir),
                                max_steps=30, lr=3e-3, batch_size=2, eval_fraction=0.25),
                   say=lines.append)
    assert result.perplexity_after < result.perplexity_before
    summary = json.loads((tmp_path / "m" / "dialogbot-training.json").read_text())
    assert summary["perplexity"] == {"before": result.perplexity_before,
                                     "after": result.perplexity_after}
    assert summary["examples"] == {"train": 9, "eval": 3, "skipped": 0, "dialogues": 12}
    assert any(line.startswith("perplexity after training:") for line in lines)


class StopAt:
    """A callback that asks the run to stop at `step`, as Ctrl-C does."""

    def __new__(cls, step, stop):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if state.global_step == step:
                    stop.set()

        return _Stop()


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_stopping_after_k_steps_and_resuming_equals_an_uninterrupted_run(
        tmp_path, tiny_model_dir):
    import torch

    from bot.errors import ConfigError
    from bot.train import StopRequest, TrainOptions, train

    data = script(tmp_path)

    def options(out, **more):
        values = dict(data=data, out=tmp_path / out, base=str(tiny_model_dir),
                      character="Rick", max_steps=12, lr=1e-3, batch_size=2, save_steps=100,
                      eval_fraction=0.2, seed=7)
        return TrainOptions(**(values | more))

    whole = train(options("whole"), say=lambda _: None)
    stop = StopRequest()
    part = train(options("split"), say=lambda _: None, callbacks=[StopAt(5, stop)], stop=stop)
    assert part.interrupted and part.steps == 5
    assert part.checkpoint == tmp_path / "split.partial" / "checkpoint-5"
    assert part.checkpoint.is_dir() and not (tmp_path / "split").exists()
    with pytest.raises(ConfigError, match="interrupted run .* --resume"):
        train(options("split"), say=lambda _: None)
    with pytest.raises(ConfigError, match="--lr differs"):
        train(options("split", resume=True, lr=2e-3), say=lambda _: None)

    done = train(options("split", resume=True), say=lambda _: None)
    assert done.steps == 12 and not done.interrupted
    assert done.perplexity_before == whole.perplexity_before
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert done.perplexity_after == pytest.approx(whole.perplexity_after, rel=1e-5)
    assert not (tmp_path / "split.partial").exists()


def test_ctrl_c_saves_a_checkpoint_and_prints_how_to_resume(tmp_path, env, tiny_model_dir):
    out = tmp_path / "m"
    args = ["train", str(script(tmp_path)), "--base", str(tiny_model_dir), "--out", str(out),
            "--max-steps", "100", "--batch-size", "1", "--eval-fraction", "0"]
    proc = subprocess.Popen([str(BIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if line.startswith("training:"):
                proc.send_signal(signal.SIGINT)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "stopping: saving a checkpoint" in stdout and "Traceback" not in stderr
    step = int(stderr.split("stopped at step ")[1].split(";")[0])
    assert 1 <= step < 100 and (tmp_path / "m.partial" / f"checkpoint-{step}").is_dir()
    assert not out.exists()
    command = shlex.split(stderr.split("resume with: ")[1].strip())
    assert command[0] == "dialogbot" and command[-1] == "--resume"

    resumed = run(command[1:], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path / 'm.partial' / f'checkpoint-{step}'}" in resumed.stdout
    assert json.loads((out / "dialogbot-training.json").read_text())["steps"] == 100


# Loaded by every Python the test starts (PYTHONPATH): at interpreter exit each worker says
# whether it is still in the process group. One that is leaves gloo's threads to be torn down
# with Python, which now and then aborts it (SIGABRT; once in CI).
EXIT_PROBE = """
import atexit, os, sys

def _say():
    import torch.distributed as dist
    print(f"rank {os.environ['RANK']} at exit: in a process group: {dist.is_initialized()}",
          file=sys.stderr, flush=True)

if "RANK" in os.environ:
    atexit.register(_say)
"""


def test_torchrun_two_cpu_processes_train_and_write_one_model(tmp_path, tmp_path_factory, env,
                                                              tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"turns": [q, a, q]}) + "\n" for q, a in EXCHANGES))
    out = tmp_path / "ddp"
    probe = tmp_path_factory.mktemp("exit-probe")
    (probe / "sitecustomize.py").write_text(EXIT_PROBE)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(BIN), "train", str(data),
         "--base", str(tiny_model_dir), "--out", str(out), "--max-steps", "6",
         "--batch-size", "2", "--eval-fraction", "0.25"],
        capture_output=True, text=True, env=dict(env, PYTHONPATH=str(probe)), cwd=tmp_path,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for worker in ("0", "1"):
        assert f"rank {worker} at exit: in a process group: False" in result.stderr, \
            result.stderr[-3000:]
    assert result.stdout.count("model written to") == 1
    assert "(2 processes)" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "ddp"]
    summary = json.loads((out / "dialogbot-training.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    assert summary["perplexity"]["after"] is not None
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 2


# --- bad input: one line on stderr, exit code 2 ----------------------------------------------
def _bad_inputs(tmp: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    good = script(tmp)
    (tmp / "empty.csv").write_text("")
    (tmp / "cols.csv").write_text("speaker,text\nA,hi\nB,yo\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9\nno\n".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"turns": ["a", "b"]}\n{"turns": "ab"}\n')
    (tmp / "taken").mkdir()
    (tmp / "taken" / "notes.txt").write_text("mine")
    base = ["--base", str(model)]
    return {
        "missing file": (["nope.csv", "--out", "o", *base], "nope.csv: no such file"),
        "empty file": (["empty.csv", "--out", "o", *base], "empty.csv: the file is empty"),
        "no columns": (["cols.csv", "--character", "A", "--out", "o", *base],
                       "no column 'line' or 'name'"),
        "silent character": ([str(good), "--character", "Summer", "--out", "o", *base],
                             "'Summer' never speaks"),
        "not utf-8": (["latin1.txt", "--out", "o", *base], "not UTF-8 text (byte 0xe9 on line 1)"),
        "bad jsonl line": (["bad.jsonl", "--out", "o", *base], "bad.jsonl: line 2: not a dialogue"),
        "base not loadable": ([str(good), "--out", "o", "--base", "no-such-model"],
                              "--base 'no-such-model' could not be loaded"),
        "out not a model": ([str(good), "--out", "taken", *base], "add --overwrite"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty file", "no columns", "silent character",
                                  "not utf-8", "bad jsonl line", "base not loadable",
                                  "out not a model"])
def test_bad_input_gives_one_line_and_exit_code_2(case, tmp_path, env, tiny_model_dir):
    args, message = _bad_inputs(tmp_path, tiny_model_dir)[case]
    result = run(["train", *args], env, tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("dialogbot: ") and result.stderr.count("\n") == 1, \
        result.stderr
    assert message in result.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
