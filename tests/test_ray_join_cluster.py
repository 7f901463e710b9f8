"""Joining a Ray cluster started with `ray start --head` (slow: starts its own Ray head)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

pytest.importorskip("ray")

DRIVER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import numpy as np, ray
    from meshweave.runtime import ray as mw_ray
    from meshweave.runtime.ray.sample_programs import mlp_pipeline
    p = mlp_pipeline()
    c = mw_ray.start(address=sys.argv[1], num_hosts=2, devices_per_host=4)
    assert c.node_ids is None          # one node: the two hosts are simulated on it
    outs = mw_ray.RayProgramExecutor(p.program)(*p.args)
    for a, b in zip(outs, p.reference(*p.args)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    mw_ray.shutdown()
    assert not ray.is_initialized()
    print("JOINED-OK")
""")


@pytest.mark.slow
def test_join_existing_cluster():
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="mwray")          # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="disabled")
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={tmp}", "--num-cpus=4",
                             "--include-dashboard=false", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = None
        for _ in range(3):                           # the head needs a few seconds to accept drivers
            time.sleep(5)
            r = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{port}"], env=env,
                               capture_output=True, text=True, timeout=180)
            out = r.stdout + r.stderr
            if "JOINED-OK" in r.stdout:
                break
        assert "JOINED-OK" in out, out[-3000:]
        assert head.poll() is None, "shutdown() must not stop a cluster meshweave only joined"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(tmp, ignore_errors=True)
