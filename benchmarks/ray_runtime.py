"""Costs of the Ray runtime on this machine: start-up, per-step driver overhead, per-micro-batch
orchestration, cross-worker transfer throughput (issue 11).

Programs are hand-built (`meshweave.runtime.ray.sample_programs`): a 2-stage MLP pipeline
(GPipe, gradient accumulation) on two 4-device meshes, and a one-hop transfer between them.
The in-process reference runs the *same* fragments and instruction lists in this process
(8 simulated devices, transfers by `jax.device_put`), so "overhead" is what Ray adds to the
same plan. Every timing is the median over repeated steps after warm-up.

    python benchmarks/ray_runtime.py [--repeats 20] [--out benchmarks/results/ray_runtime.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402

from meshweave.plugin.jax_adapter import compile_text_for_devices, executable_shardings  # noqa: E402
from meshweave.runtime import ray as mw_ray  # noqa: E402
from meshweave.runtime.program import InputBinding, Instruction, MeshDesc, OutputBinding, Program  # noqa: E402
from meshweave.runtime.ray.sample_programs import lower_fragment, mlp_pipeline, sig  # noqa: E402


class InProcess:
    """The same Program run in this process: meshes are subsets of the local devices."""

    def __init__(self, program: Program):
        devs = jax.devices()
        self.p = program
        self.meshes, self.frags = {}, {}
        for m in program.meshes:
            d = [devs[i] for i in m.device_ids]
            self.meshes[m.name] = Mesh(np.array(d).reshape(m.shape), m.axis_names,
                                       axis_types=(AxisType.Auto,) * len(m.shape))
        for f in program.fragments:
            jm = self.meshes[f.mesh]
            d = list(jm.devices.flat)
            exe = compile_text_for_devices(f.mlir, d)
            ins = executable_shardings(exe, d, [self._ns(jm, s) for s in f.inputs], [len(s.shape) for s in f.inputs],
                                       outputs=False)
            outs = executable_shardings(exe, d, [self._ns(jm, s) for s in f.outputs],
                                        [len(s.shape) for s in f.outputs], outputs=True)
            self.frags[f.name] = (exe, ins, outs, [s.shape for s in f.outputs])

    @staticmethod
    def _ns(jm, s):
        return NamedSharding(jm, PartitionSpec(*[None if not d else d[0] if len(d) == 1 else d for d in s.sharding]))

    def __call__(self, *args):
        bufs = {m.name: {} for m in self.p.meshes}
        for b in self.p.inputs:
            a, k = args[b.index], b.micro_batches
            sh = self._ns(self.meshes[b.mesh], b.sig)
            if k == 1:
                bufs[b.mesh][b.key] = jax.device_put(a, sh)
            else:
                n = a.shape[0] // k
                for m in range(k):
                    bufs[b.mesh][f"{b.key}#{m}"] = jax.device_put(a[m * n:(m + 1) * n], sh)
        mail, pc = {}, {m: 0 for m in bufs}
        lists = self.p.instructions
        while any(pc[m] < len(lists.get(m, ())) for m in pc):
            progressed = False
            for m in pc:
                while pc[m] < len(lists.get(m, ())):
                    ins, buf = lists[m][pc[m]], bufs[m]
                    if ins.op == "recv":
                        if (ins.peer, m, ins.outputs[0]) not in mail:
                            break
                        buf[ins.outputs[0]] = jax.device_put(mail.pop((ins.peer, m, ins.outputs[0])),
                                                             self._ns(self.meshes[m], ins.sig))
                    elif ins.op == "send":
                        mail[(m, ins.peer, ins.inputs[0])] = buf[ins.inputs[0]]
                    elif ins.op == "run":
                        exe, in_sh, out_sh, shapes = self.frags[ins.fragment]
                        xs = [buf[k] if buf[k].sharding.is_equivalent_to(s, buf[k].ndim) else jax.device_put(buf[k], s)
                              for k, s in zip(ins.inputs, in_sh)]
                        outs = exe.execute_sharded(xs).disassemble_into_single_device_arrays()
                        for k, shards, s, shp in zip(ins.outputs, outs, out_sh, shapes):
                            buf[k] = jax.make_array_from_single_device_arrays(shp, s, shards)
                    elif ins.op == "accumulate":
                        src, dst = buf[ins.inputs[0]], ins.outputs[0]
                        buf[dst] = src if dst not in buf else buf[dst] + src
                    elif ins.op == "free":
                        for k in ins.inputs:
                            buf.pop(k, None)
                    pc[m] += 1
                    progressed = True
            if not progressed:
                raise RuntimeError("in-process reference deadlocked")
        outs = [bufs[o.mesh][o.key] for o in self.p.outputs]
        jax.block_until_ready(outs)
        return outs


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 3)


def _ray_step(ex, args, feed_back):
    """One Ray step that feeds the parameter handles back (they stay on the workers)."""
    state = {"args": list(args)}

    def go():
        outs = ex(*state["args"])
        for arg_i, out_i in feed_back:
            state["args"][arg_i] = outs[out_i]
        ex.last_outs = outs
    return go


def mlp_steps(repeats: int, micro_batches: int, batch: int, hidden: int) -> dict:
    p = mlp_pipeline(batch=batch, d_in=hidden, d_hidden=hidden, d_out=hidden, micro_batches=micro_batches)
    ex = mw_ray.RayProgramExecutor(p.program)
    go = _ray_step(ex, p.args, [(0, 0), (2, 1)])
    ray_ms = _median_ms(go, repeats)
    totals = []
    for _ in range(repeats):
        go()
        worker_max = max(w["total"] for w in ex.last_stats.per_worker.values())
        totals.append((ex.last_stats.wall_s - worker_max) * 1e3)
    local = InProcess(p.program)
    state = {"a": list(p.args)}

    def local_go():
        outs = local(*state["a"])
        state["a"][0], state["a"][2] = outs[0], outs[1]
    local_ms = _median_ms(local_go, repeats)
    ok = all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
             for a, b in zip(ex(*p.args), local(*p.args)))
    ex.close()
    return {"micro_batches": micro_batches, "batch": batch, "hidden": hidden, "ray_step_ms": ray_ms,
            "in_process_step_ms": local_ms, "ray_minus_in_process_ms": round(ray_ms - local_ms, 3),
            "driver_overhead_ms": round(statistics.median(totals), 3), "results_match_in_process": bool(ok)}


def transfer(repeats: int, nbytes: int, dst_spec) -> dict:
    n = nbytes // 4
    cols = 256
    shape = (n // cols, cols)
    a = MeshDesc("a", (4,), ("d",), (0, 1, 2, 3))
    b = MeshDesc("b", (4,), ("d",), (4, 5, 6, 7))
    src, dst = sig(shape, ("d",)), sig(shape, dst_spec)
    prog = Program((a, b), (lower_fragment("touch", b, "forward", 1, lambda v: v[:1, :1], [dst], [sig((1, 1))]),),
                   {"a": (Instruction("send", ("x",), peer="b"),),
                    "b": (Instruction("recv", outputs=("x",), peer="a", sig=dst),
                          Instruction("run", ("x",), ("y",), fragment="touch"))},
                   (InputBinding(0, "a", "x", src),),
                   (OutputBinding(0, "a", "x", src), OutputBinding(1, "b", "y", sig((1, 1)))))
    ex = mw_ray.RayProgramExecutor(prog)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    held = ex(x)[0]                               # x now lives on mesh a's worker
    ms = _median_ms(lambda: ex(held), repeats)
    recv_ms = ex.last_stats.per_worker["b/h1"]["recv"] * 1e3
    ex.close()
    return {"mb": round(nbytes / 2 ** 20, 3), "shape": list(shape), "src_spec": ["d", None],
            "dst_spec": list(dst_spec) + [None] * (2 - len(dst_spec)), "step_ms": ms,
            "last_step_recv_wait_ms": round(recv_ms, 3),
            "throughput_mb_s": round(nbytes / 2 ** 20 / (ms / 1e3), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/ray_runtime.json")
    args = p.parse_args(argv)

    t = time.perf_counter()
    cluster = mw_ray.start(num_hosts=2, devices_per_host=4)
    startup = {"ray_start_s": round(time.perf_counter() - t, 3)}
    t = time.perf_counter()
    cluster.group_for((0, 1, 2, 3), "a")
    startup["one_worker_start_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    cluster.group_for(tuple(range(8)), "ab")
    startup["two_worker_jax_distributed_group_start_s"] = round(time.perf_counter() - t, 3)
    cluster.group_for((4, 5, 6, 7), "b")
    t = time.perf_counter()
    ex = mw_ray.RayProgramExecutor(mlp_pipeline().program)
    startup["mlp_program_load_s (5 fragments compiled in 2 workers)"] = round(time.perf_counter() - t, 3)
    ex.close()

    steps = [mlp_steps(args.repeats, k, batch=8 * k, hidden=16) for k in (4, 16, 32)]
    steps.append(mlp_steps(args.repeats, 4, batch=256, hidden=1024))
    tiny = steps[:3]
    # Cost of one more micro-batch (both stages, both directions) = slope over k; per stage: / 2.
    k0, k1 = tiny[0]["micro_batches"], tiny[-1]["micro_batches"]
    slope_ray = (tiny[-1]["ray_step_ms"] - tiny[0]["ray_step_ms"]) / (k1 - k0)
    slope_local = (tiny[-1]["in_process_step_ms"] - tiny[0]["in_process_step_ms"]) / (k1 - k0)
    per_mb = {"ray_ms_per_micro_batch_per_stage": round(slope_ray / 2, 3),
              "in_process_ms_per_micro_batch_per_stage": round(slope_local / 2, 3),
              "orchestration_overhead_ms_per_micro_batch_per_stage": round((slope_ray - slope_local) / 2, 3),
              "what": "slope of the median step time over micro-batches 4->32 of the tiny MLP pipeline "
                      "(per micro-batch and stage: 1-2 runs, 1 send, 1 recv, 1-2 accumulates, frees), "
                      "divided by 2 stages; overhead = Ray minus the same plan in-process"}
    transfers = [transfer(args.repeats, int(mb * 2 ** 20), ("d",)) for mb in (1, 16, 128)]
    transfers.append(transfer(args.repeats, 16 * 2 ** 20, (None, "d")))
    t = time.perf_counter()
    mw_ray.shutdown()
    startup["shutdown_s"] = round(time.perf_counter() - t, 3)

    out = {
        "command": " ".join([sys.executable.split("/")[-1], "benchmarks/ray_runtime.py"] + (argv or sys.argv[1:])),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "jax": jax.__version__, "ray": __import__("ray").__version__, "load_average": os.getloadavg()},
        "setup": "2 simulated hosts x 4 CPU devices; one Ray actor per mesh and host; num_cpus=0 actors on a "
                 "2-core machine shared with other work, so timings vary by tens of percent",
        "targets": {"orchestration_overhead_below_1ms_per_micro_batch_per_stage":
                    per_mb["orchestration_overhead_ms_per_micro_batch_per_stage"] < 1.0,
                    "1MB_transfer_ms_vs_plain_actor_baseline_9.1": transfers[0]["step_ms"],
                    "16MB_transfer_ms_vs_plain_actor_baseline_39.8": transfers[1]["step_ms"]},
        "startup": startup, "per_micro_batch": per_mb, "steps": steps, "transfers": transfers,
        "notes": ["transfer step_ms is a whole step: driver call, sender pieces -> object store -> receiver "
                  "(zero-copy when the layouts match), reshard, and a 1-element fragment on the receiver",
                  "baselines from the shared Ray notes (same machine): plain actor 2-stage pipeline 1 MB "
                  "9.1-11.5 ms, 16 MB 39.8-99.7 ms; Compiled Graphs 1.0-1.5 / 8.0-12.1 ms"],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: out[k] for k in ("targets", "startup", "per_micro_batch")}, indent=1))
    for row in steps + transfers:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
