"""Entry-script runtime helpers: stderr notices only for slow steps, the compile-cache default."""

import io
import time

from dynllava_jax import runtime


def test_notice_is_silent_when_quick_and_says_when_slow():
    out = io.StringIO()
    with runtime.notice("loading", after=5.0, stream=out):
        pass
    assert out.getvalue() == ""
    with runtime.notice("compiling", after=0.01, stream=out):
        time.sleep(0.2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "compiling..." and lines[1].startswith("compiling: done in ")


def test_compile_cache_default_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.CACHE_ENV, "off")
    assert runtime.default_compile_cache() is None
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path))
    assert runtime.default_compile_cache() == str(tmp_path)
    monkeypatch.delenv(runtime.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.default_compile_cache() == str(tmp_path / "dynllava_jax" / "jax")
