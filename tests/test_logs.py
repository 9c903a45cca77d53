"""No token reaches a log line: messages, arguments, URLs and tracebacks are redacted."""

import logging

from bot.logs import REDACTED, setup_logging

TELEGRAM = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
DISCORD = "MTA5ODc2NTQzMjEwOTg3NjU0Mw.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB"


def test_tokens_are_redacted_everywhere(capfd):
    setup_logging("DEBUG", [TELEGRAM, DISCORD])
    lib = logging.getLogger("telegram.ext.ExtBot")
    lib.info("POST https://api.telegram.org/bot%s/getUpdates", TELEGRAM)
    logging.getLogger("discord.http").warning("token %r rejected", DISCORD)
    try:
        raise RuntimeError(f"connect failed: https://api.telegram.org/bot{TELEGRAM}/getMe")
    except RuntimeError:
        logging.getLogger("httpx").error("request failed", exc_info=True)
    logging.getLogger("x").info("url-encoded %s", TELEGRAM.replace(":", "%3A"))
    err = capfd.readouterr().err
    assert TELEGRAM not in err and DISCORD not in err
    assert "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw" not in err
    assert err.count(REDACTED) >= 4 and "Traceback" in err and "getUpdates" in err


def test_without_secrets_messages_pass_unchanged(capfd):
    setup_logging("INFO", [])
    logging.getLogger("bot").info("hello %s", "world")
    assert "hello world" in capfd.readouterr().err
