"""The Ray backend on 2 simulated hosts x 4 CPU devices: results equal jax.jit, handles, failures.

Ray starts once per session (`ray_runtime` in conftest.py); workers are shared by device set,
so the default tests start four mesh workers in all. The kill test restarts Ray; tests after it
reach the fresh cluster through `mw_ray.current()`.
"""
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshweave.runtime.program import InputBinding, Instruction, MeshDesc, OutputBinding, Program
from meshweave.runtime.ray.sample_programs import lower_fragment, mlp_pipeline, sig

pytest.importorskip("ray")
from meshweave.runtime import ray as mw_ray  # noqa: E402

MESH_A = MeshDesc("a", (4,), ("d",), (0, 1, 2, 3))
MESH_B = MeshDesc("b", (4,), ("d",), (4, 5, 6, 7))
X = sig((8, 4), ("d",))


@pytest.fixture(scope="module")
def mlp():
    return mlp_pipeline()


def _close(actual, expected):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)


def _two_mesh(fn_a, ins_a, ins_b, out_mesh="b", out_key="y"):
    """x on mesh a; `fn_a` is fragment "fa" on a and doubling is fragment "fb" on b."""
    frags = (lower_fragment("fa", MESH_A, "forward", 0, fn_a, [X], [X]),
             lower_fragment("fb", MESH_B, "forward", 1, lambda v: 2 * v, [X], [X]))
    return Program((MESH_A, MESH_B), frags, {"a": tuple(ins_a), "b": tuple(ins_b)},
                   (InputBinding(0, "a", "x", X),), (OutputBinding(0, out_mesh, out_key, X),))


def test_mlp_pipeline_three_steps_equal_jit(ray_runtime, mlp):
    ex = mw_ray.RayProgramExecutor(mlp.program)
    args, ref_args = mlp.args, mlp.args
    for _ in range(3):
        outs = ex(*args)
        ref = mlp.reference(*ref_args)
        _close(outs, ref)
        # parameters stay on the workers: the next step gets the handles back
        args = (outs[0], args[1], outs[1], args[3])
        ref_args = (np.asarray(ref[0]), ref_args[1], np.asarray(ref[1]), ref_args[3])
    assert set(ex.last_stats.per_worker) == {"stage0/h0", "stage1/h1"}
    ex.close()


def test_handles_metadata_fetch_and_free(ray_runtime, mlp):
    ex = mw_ray.RayProgramExecutor(mlp.program)
    w1, w2, loss = ex(*mlp.args)
    assert w1.shape == mlp.args[0].shape and w1.dtype == np.float32
    assert w1.sharding.mesh.name == "stage0" and w1.sharding.spec == ((), ("mp",))
    assert loss.shape == () and float(jax.device_get(loss)) > 0
    group = ray_runtime.groups[(0, 1, 2, 3)]
    import ray
    held = ray.get(group.workers[0].held_count.remote())
    w1.delete()
    assert ray.get(group.workers[0].held_count.remote()) == held - 1
    with pytest.raises(mw_ray.RayRuntimeError, match="deleted"):
        np.asarray(w1)
    # dropped handles are freed by the workers at the next step: held buffers stay bounded
    args = (w1_keep := ex(*mlp.args)[0], mlp.args[1], mlp.args[2], mlp.args[3])
    before = ray.get(group.workers[0].held_count.remote())
    for _ in range(4):
        outs = ex(*args)
        args = (outs[0], args[1], args[2], args[3])
    del outs, w1_keep
    assert ray.get(group.workers[0].held_count.remote()) <= before + 2     # not before + 4
    # a handle from another mesh is moved worker to worker (and resharded) when fed back
    ex2 = mw_ray.RayProgramExecutor(_two_mesh(lambda v: v + 1, [Instruction("run", ("x",), ("x1",), fragment="fa"),
                                                                 Instruction("send", ("x1",), peer="b")],
                                              [Instruction("recv", outputs=("x1",), peer="a", sig=X),
                                               Instruction("run", ("x1",), ("y",), fragment="fb")]))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    y = ex2(x)[0]
    np.testing.assert_array_equal(np.asarray(y), 2 * (x + 1))
    with pytest.raises(ValueError, match=r"shape \(4, 8\), the program expects \(8, 4\)"):
        ex2(x.T)
    with pytest.raises(TypeError, match="takes 1 flat arguments, got 2"):
        ex2(x, x)
    ex.close()
    ex2.close()


def test_large_transfer_resharded_block_by_block(ray_runtime):
    """Above 1 MiB each receiving device gets its own block (rows were sent, columns are kept)."""
    src, dst = sig((1024, 512), ("d",)), sig((1024, 512), (None, "d"))
    frags = (lower_fragment("fa", MESH_A, "forward", 0, lambda v: v * 3, [src], [src]),
             lower_fragment("fb", MESH_B, "forward", 1, lambda v: v + 1, [dst], [dst]))
    prog = Program((MESH_A, MESH_B), frags,
                   {"a": (Instruction("run", ("x",), ("x3",), fragment="fa"), Instruction("send", ("x3",), peer="b")),
                    "b": (Instruction("recv", outputs=("x3",), peer="a", sig=dst),
                          Instruction("run", ("x3",), ("y",), fragment="fb"))},
                   (InputBinding(0, "a", "x", src),), (OutputBinding(0, "b", "y", dst),))
    x = np.random.default_rng(2).standard_normal((1024, 512), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(mw_ray.RayProgramExecutor(prog)(x)[0]), x * 3 + 1, rtol=1e-6)


def test_worker_error_names_mesh_host_instruction(ray_runtime):
    bad = _two_mesh(lambda v: v, [Instruction("run", ("missing",), ("x1",), fragment="fa"),
                                  Instruction("send", ("x1",), peer="b")],
                    [Instruction("recv", outputs=("x1",), peer="a", sig=X),
                     Instruction("run", ("x1",), ("y",), fragment="fb")])
    ex = mw_ray.RayProgramExecutor(bad, step_timeout=60)
    t = time.monotonic()
    with pytest.raises(mw_ray.WorkerStepError, match=r"mesh 'a' host 0: step 1, instruction 0 \(run fa\).*KeyError"):
        ex(np.ones((8, 4), np.float32))
    assert time.monotonic() - t < 10          # the waiting peer was aborted, not waited out
    # the same workers still serve a good program afterwards
    good = _two_mesh(lambda v: v, [Instruction("run", ("x",), ("x1",), fragment="fa"),
                                   Instruction("send", ("x1",), peer="b")],
                     [Instruction("recv", outputs=("x1",), peer="a", sig=X),
                      Instruction("run", ("x1",), ("y",), fragment="fb")])
    np.testing.assert_array_equal(np.asarray(mw_ray.RayProgramExecutor(good)(np.ones((8, 4), np.float32))[0]), 2.0)


def test_bad_fragment_fails_at_load_naming_mesh_and_host(ray_runtime):
    import dataclasses

    prog = _two_mesh(lambda v: v, [], [])
    broken = dataclasses.replace(prog.fragments[1], mlir="module { this is not mlir }")
    with pytest.raises(mw_ray.RayRuntimeError, match=r"mesh 'b' host 1: loading the program failed"):
        mw_ray.RayProgramExecutor(dataclasses.replace(prog, fragments=(prog.fragments[0], broken)))


def test_step_timeout_names_the_waiting_instruction(ray_runtime):
    stuck = _two_mesh(lambda v: v, [Instruction("run", ("x",), ("x1",), fragment="fa")],
                      [Instruction("recv", outputs=("y",), peer="a", sig=X)])
    ex = mw_ray.RayProgramExecutor(stuck, step_timeout=2.0)
    pid = mw_ray.current().groups[MESH_B.device_ids].pids[0]
    cpu = _cpu_seconds(pid)
    with pytest.raises(mw_ray.StepTimeoutError,
                       match=r"within 2.0 s.*mesh 'b' host 1 \(pid \d+\) at instruction 0 \(recv y <- a\)"):
        ex(np.ones((8, 4), np.float32))
    # blocked in RECV for 2 s, the worker slept on a condition variable instead of spinning
    assert cpu is None or _cpu_seconds(pid) - cpu < 0.5


def _cpu_seconds(pid: int) -> float | None:
    if not os.path.exists(f"/proc/{pid}/stat"):     # not Linux: no cheap per-process CPU clock
        return None
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")      # utime + stime


def test_shard_parallel_step_over_two_workers_equals_jit(ray_runtime):
    """One (2, 4) mesh over both hosts: its two workers form one jax.distributed group
    (CPU collectives over gloo) and run the same SPMD step."""
    mesh = MeshDesc("m", (2, 4), ("dp", "mp"), tuple(range(8)))

    def step(w1, w2, x, y):
        def loss(w1, w2):
            return jnp.mean((jnp.tanh(x @ w1) @ w2 - y) ** 2)
        value, (g1, g2) = jax.value_and_grad(loss, argnums=(0, 1))(w1, w2)
        return w1 - 0.1 * g1, w2 - 0.1 * g2, value

    ins = [sig((16, 32), (None, "mp")), sig((32, 8), ("mp",)), sig((32, 16), ("dp",)), sig((32, 8), ("dp",))]
    outs = [ins[0], ins[1], sig(())]
    keys = ["w1", "w2", "x", "y"]
    prog = Program((mesh,), (lower_fragment("step", mesh, "step", 0, step, ins, outs),),
                   {"m": (Instruction("run", tuple(keys), ("w1n", "w2n", "loss"), fragment="step"),)},
                   tuple(InputBinding(i, "m", k, s) for i, (k, s) in enumerate(zip(keys, ins))),
                   tuple(OutputBinding(i, "m", k, s) for i, (k, s) in enumerate(zip(["w1n", "w2n", "loss"], outs))))
    ex = mw_ray.RayProgramExecutor(prog, step_timeout=120)
    assert len(ray_runtime.groups[tuple(range(8))].workers) == 2
    rng = np.random.default_rng(1)
    args = [rng.standard_normal(s.shape, np.float32) for s in ins]
    ref_args = args
    for _ in range(3):
        res = ex(*args)
        ref = jax.jit(step)(*ref_args)
        _close(res, ref)
        args = [res[0], res[1]] + args[2:]
        ref_args = [np.asarray(ref[0]), np.asarray(ref[1])] + ref_args[2:]


def _slow(v):
    """Minutes of work (until the int32 counter wraps): the test kills it long before."""
    w = jnp.eye(v.shape[1], dtype=v.dtype) * 0.5
    return jax.lax.while_loop(lambda s: s[1] >= 0, lambda s: (jnp.tanh(s[0] @ w) + s[0], s[1] + 1),
                              (v, jnp.int32(0)))[0]


def test_killed_worker_fails_fast_then_restart_works(ray_runtime, mlp):
    """Kills a worker mid-step, then shuts Ray down and starts it again for the session."""
    prog = _two_mesh(_slow, [Instruction("run", ("x",), ("x1",), fragment="fa"),
                             Instruction("send", ("x1",), peer="b")],
                     [Instruction("recv", outputs=("x1",), peer="a", sig=X),
                      Instruction("run", ("x1",), ("y",), fragment="fb")])
    ex = mw_ray.RayProgramExecutor(prog, step_timeout=60)
    group = ray_runtime.groups[(0, 1, 2, 3)]
    killed_at = []

    def kill_when_running():
        path = group.progress_paths[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if tuple(np.fromfile(path, dtype=np.int64, count=3)[1:]) == (1, 0):   # step 1 in instruction 0
                time.sleep(0.3)
                killed_at.append(time.monotonic())
                os.kill(group.pids[0], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    with pytest.raises(mw_ray.WorkerDiedError, match=r"mesh 'a' host 0 \(pid \d+\) at instruction 0 \(run fa\) died"):
        ex(np.ones((8, 4), np.float32))
    killer.join()
    assert killed_at and time.monotonic() - killed_at[0] < 10
    with pytest.raises(mw_ray.RayRuntimeError, match="closed"):
        ex(np.ones((8, 4), np.float32))
    mw_ray.shutdown()
    mw_ray.start(num_hosts=2, devices_per_host=4)
    outs = mw_ray.RayProgramExecutor(mlp.program)(*mlp.args)
    _close(outs, mlp.reference(*mlp.args))


@pytest.mark.slow
def test_transfers_to_and_from_a_mesh_spanning_two_hosts(ray_runtime):
    """Mesh p (devices 0, 1: host 0) and mesh q (devices 2..5: two workers on two hosts, one
    jax.distributed group): q's workers each wait for p's pieces; p waits for both of q's."""
    p = MeshDesc("p", (2,), ("d",), (0, 1))
    q = MeshDesc("q", (2, 2), ("x", "y"), (2, 3, 4, 5))
    sp, sq = sig((8, 6), ("d",)), sig((8, 6), ("x", "y"))
    frags = (lower_fragment("fp", p, "forward", 0, lambda v: v + 1, [sp], [sp]),
             lower_fragment("fq", q, "forward", 1, lambda v: v * 2, [sq], [sq]))
    prog = Program((p, q), frags,
                   {"p": (Instruction("run", ("x",), ("x1",), fragment="fp"), Instruction("send", ("x1",), peer="q"),
                          Instruction("recv", outputs=("y",), peer="q", sig=sp)),
                    "q": (Instruction("recv", outputs=("x1",), peer="p", sig=sq),
                          Instruction("run", ("x1",), ("y",), fragment="fq"), Instruction("send", ("y",), peer="p"))},
                   (InputBinding(0, "p", "x", sp),), (OutputBinding(0, "p", "y", sp), OutputBinding(1, "q", "y", sq)))
    ex = mw_ray.RayProgramExecutor(prog, step_timeout=120)
    assert len(mw_ray.current().groups[(2, 3, 4, 5)].workers) == 2
    x = np.arange(48, dtype=np.float32).reshape(8, 6)
    on_p, on_q = ex(x)
    np.testing.assert_array_equal(np.asarray(on_p), (x + 1) * 2)
    np.testing.assert_array_equal(np.asarray(on_q), (x + 1) * 2)
