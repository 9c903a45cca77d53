"""dialogbot core: platform-neutral pipeline around Microsoft's DialoGPT.

Nothing in this package imports discord, telegram or sqlalchemy: adapters/ and storage/
depend on it, never the reverse. `bot.app` is the one composition root.
"""

__version__ = "0.1.0"
