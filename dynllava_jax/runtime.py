"""Process-level settings of the entry scripts: JAX's persistent compilation cache, and
notices on stderr for steps that take more than a moment."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

CACHE_ENV = "DYNLLAVA_JAX_COMPILE_CACHE"  # a directory, or "off"


def default_compile_cache() -> str | None:
    """``$DYNLLAVA_JAX_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/dynllava_jax/jax`` (``~/.cache/...``);
    None where the variable says ``off``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return None if env.lower() in ("off", "0", "none", "false") else env
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "dynllava_jax" / "jax")


def enable_compile_cache(path: str | None) -> None:
    """Keep compiled programs in ``path`` across runs (None: off). The second run of the same
    command with the same shapes then loads its programs instead of compiling them."""
    if path is None:
        return
    import jax
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Our small programs compile in well under JAX's default threshold of 1 s each, yet a
    # command compiles several of them: cache all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@contextlib.contextmanager
def notice(message: str, after: float = 1.0, stream=None):
    """Print ``message...`` on stderr if the block is still running after ``after`` seconds,
    and how long it took when it ends; quick blocks print nothing."""
    stream = stream or sys.stderr
    start = time.monotonic()
    shown = threading.Event()

    def show():
        shown.set()
        print(f"{message}...", file=stream, flush=True)

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if shown.is_set():
            print(f"{message}: done in {time.monotonic() - start:.1f} s", file=stream, flush=True)
