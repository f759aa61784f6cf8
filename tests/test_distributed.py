"""Capture and solvers in JAX's multi-process runtime: two CPU processes (gloo collectives), each holding
half of the calibration batches on a mesh that spans both, give the Hessians and GPTQ result of one process."""

import os
import socket
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import compressjax as cj

L, D = 3, 16

SETUP = """
import numpy as np, jax.numpy as jnp
from jax import lax
L, D = 3, 16
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(L, D, D)) * 0.3, jnp.float32), "head": jnp.asarray(rng.normal(size=(D, 4)) * 0.3, jnp.float32)}
batches = [np.asarray(rng.normal(size=(8, D)), np.float32) for _ in range(4)]
def apply(p, x):
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0] @ p["head"]
"""

SOLVE = """
def solve(H):
    spec = cj.QuantSpec(bits=4, group_size=8)
    hw = H["w"]
    qs = [cj.gptq({"w": params["w"][l]}, {"w": cj.Hessian(hw.h[l], hw.count[l], (0,))}, spec)["w"] for l in range(L)]
    qh = cj.gptq({"head": params["head"]}, {"head": H["head"]}, spec)["head"]
    return dict(wh=np.asarray(hw.h), wc=np.asarray(hw.count), hh=np.asarray(H["head"].h),
                qw=np.stack([np.asarray(q.ints()) for q in qs]), qs=np.stack([np.asarray(q.scale) for q in qs]),
                qh=np.asarray(cj.dequantize(qh)))
"""

WORKER = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import compressjax as cj
""" + SETUP + SOLVE + """
assert jax.process_count() == 2 and jax.device_count() == 2 and len(jax.local_devices()) == 1
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
mine = batches[2 * pid:2 * pid + 2]  # this process holds half of the calibration batches
glob = [jax.make_array_from_process_local_data(sharding, b) for b in mine]  # global (16, D) batches
H = cj.collect_hessians(apply, {k: np.asarray(v) for k, v in params.items()}, glob, mesh=mesh)
np.savez(out, **solve(H))
print("OK", pid, flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(i), str(port), str(tmp_path / f"out{i}.npz")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append((p.returncode, out, err[-3000:]))
    assert all(rc == 0 for rc, _, _ in logs), logs
    got = [dict(np.load(tmp_path / f"out{i}.npz")) for i in range(2)]
    for k in got[0]:  # both processes hold the same result
        np.testing.assert_array_equal(got[0][k], got[1][k], err_msg=k)
    ns: dict = {"cj": cj, "jnp": jnp, "lax": lax}
    exec(textwrap.dedent(SETUP + SOLVE), ns)
    one = ns["solve"](cj.collect_hessians(ns["apply"], ns["params"], ns["batches"]))
    # The Gram sums run in another order (per device, then across processes): float32 rounding.
    for k in ("wh", "hh"):
        np.testing.assert_allclose(got[0][k], one[k], rtol=1e-5, atol=1e-4, err_msg=k)
    np.testing.assert_array_equal(got[0]["wc"], one["wc"])
    np.testing.assert_array_equal(got[0]["wc"], np.full(L, 32.0))
    # GPTQ from those Hessians: the same codes, unless a rounding tie flips one code by one step.
    diff = got[0]["qw"].astype(int) - one["qw"].astype(int)
    assert np.mean(diff != 0) <= 0.01 and np.abs(diff).max() <= 1
    np.testing.assert_allclose(got[0]["qs"], one["qs"], rtol=1e-5)
    np.testing.assert_allclose(got[0]["qh"], one["qh"], rtol=1e-4, atol=1e-4)
