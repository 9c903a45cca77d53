"""End to end: `dialogbot` as a subprocess with a local model directory."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "dialogbot"


def run(args, env, stdin="", timeout=120):
    return subprocess.run([str(BIN), *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture
def env(tmp_path, tiny_model_dir):
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGBOT_")}
    base.update(DIALOGBOT_MODEL=str(tiny_model_dir), DIALOGBOT_DO_SAMPLE="false",
                DIALOGBOT_MAX_NEW_TOKENS="10", DIALOGBOT_TORCH_THREADS="1",
                DIALOGBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/db/bot.db",
                HF_HUB_OFFLINE="1")
    return base


def rows(tmp_path):
    with sqlite3.connect(tmp_path / "db" / "bot.db") as db:
        return db.execute("select role, text from turns order by id").fetchall()


def test_piped_chat_prints_one_line_per_input_and_keeps_history(env, tmp_path):
    result = run(["chat"], env, "hi there\nhow are you?\n/help\n\nwhat now\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 5, result.stdout
    assert all(lines[i].strip() for i in (0, 1, 4))
    assert "/reset" in lines[2]  # the help text, folded onto one line
    assert lines[3] == "Say something and I'll answer."
    stored = rows(tmp_path)
    assert [r for r, _ in stored] == ["user", "bot", "user", "bot", "user", "bot"]
    assert [t for r, t in stored if r == "user"] == ["hi there", "how are you?", "what now"]
    assert [t for r, t in stored if r == "bot"] == [lines[0], lines[1], lines[4]]

    again = run(["chat"], env, "remember me?\n")
    assert again.returncode == 0 and len(again.stdout.splitlines()) == 1
    assert len(rows(tmp_path)) == 8  # history persisted across runs

    reset = run(["chat"], env, "/reset\n")
    assert "forgotten" in reset.stdout and rows(tmp_path) == []


def test_reset_command_clears_one_channel(env, tmp_path):
    run(["chat", "--channel", "a"], env, "hello\n")
    run(["chat", "--channel", "b"], env, "hello\n")
    result = run(["reset", "--platform", "console", "--channel", "a"], env)
    assert result.returncode == 0 and "removed 2" in result.stdout
    assert len(rows(tmp_path)) == 2


def test_bad_setting_stops_with_one_line(env):
    env["DIALOGBOT_TOP_P"] = "9"
    result = run(["chat"], env, "hi\n")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "DIALOGBOT_TOP_P" in result.stderr


def test_missing_model_names_the_setting_without_a_traceback(env, tmp_path):
    env["DIALOGBOT_MODEL"] = str(tmp_path / "no-model")
    result = run(["chat"], env, "hi\n")
    assert result.returncode == 2
    assert "DIALOGBOT_MODEL" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help(env):
    assert run(["--version"], env).stdout.startswith("dialogbot ")
    out = run(["--help"], env).stdout
    assert all(word in out for word in ("run", "chat", "reset"))
