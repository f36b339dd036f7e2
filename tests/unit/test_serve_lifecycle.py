"""The detached head's auth token: created with Ray's own command when a fresh machine has none."""

import os
import stat

import pytest

from raydistill.serving.lifecycle import ensure_auth_token


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_missing_token_is_generated_with_ray_get_auth_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    calls = tmp_path / "calls"
    ray = _script(tmp_path / "ray", f'echo "$@" >> {calls}\nmkdir -p "$HOME/.ray" && echo tok-123 > "$HOME/.ray/auth_token"\n')
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_AUTH_TOKEN", None), env.pop("RAY_AUTH_TOKEN_PATH", None)
    ensure_auth_token(ray, env)
    assert (tmp_path / ".ray" / "auth_token").read_text().strip() == "tok-123"
    assert calls.read_text().split() == ["get-auth-token", "--generate"]
    ensure_auth_token(ray, env)  # a token exists now: Ray is not asked again
    assert calls.read_text().count("get-auth-token") == 1


def test_no_token_needed_when_auth_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ray = _script(tmp_path / "ray", "exit 3\n")
    ensure_auth_token(ray, {"RAY_AUTH_MODE": "disabled"})  # never runs the failing command


def test_a_failed_generation_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ray = _script(tmp_path / "ray", "echo 'no home' >&2\nexit 2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")} | {"RAY_AUTH_MODE": "token"}
    with pytest.raises(RuntimeError, match="ray get-auth-token --generate.*no home"):
        ensure_auth_token(ray, env)
