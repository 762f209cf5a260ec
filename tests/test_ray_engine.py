"""The Ray engine on a real local Ray cluster: a head and a second node process on loopback.

The cluster is started with ``ray start`` and stopped by killing the process groups this
module started (never ``ray stop``, which would stop every Ray runtime on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from embedsearch_test_encoders import DELAY_ENV

from embedsearch import build_index, load_bundle
from embedsearch.cli import main
from embedsearch.engines.ray_engine import RayOptions
from tests.conftest import make_collection

# The test cluster's own token (Ray's token authentication), for every process of the
# cluster and every driver, this one included, so nothing in ~/.ray is used or written. Set
# before ray is first imported: Ray reads its auth mode then.
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                   "RAY_USAGE_STATS_ENABLED": "0"})
pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
pytestmark = pytest.mark.slow

TINY = "test:tiny"
RAY = Path(sys.executable).with_name("ray")
#: Per-batch sleep of the test encoder on the cluster's nodes (the test plugin's DELAY_ENV),
#: so the resume test can kill a job midway.
THROTTLE_S = 0.25
HEAD_IP = "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HEAD_IP, 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # Each `ray start --block` leads its own process group, holding its raylet, GCS and
    # workers: signal the groups, never anything by name.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):  # stragglers keep the group id
            os.killpg(p.pid, signal.SIGKILL)


def _nodes_alive(address: str) -> int:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """HOST:PORT of a two-node Ray cluster (1 CPU each) on loopback addresses."""
    port = _free_port()
    # Ray swaps 127.0.0.1 for the network interface's address; another loopback address is
    # taken as given. The second node and the drivers then join from 127.0.0.1, so the
    # cluster's traffic stays on loopback.
    address = f"{HEAD_IP}:{port}"
    # Short: Ray's unix socket paths must fit in 107 bytes.
    temp = tempfile.mkdtemp(prefix="esray", dir="/tmp")
    env = {**os.environ, DELAY_ENV: str(THROTTLE_S)}
    common = ["--num-cpus=1", "--disable-usage-stats", "--block"]
    procs: list[subprocess.Popen[bytes]] = []
    log = open(Path(temp) / "start.log", "wb")  # noqa: SIM115 - closed in the finally
    try:
        procs.append(subprocess.Popen(
            [str(RAY), "start", "--head", f"--port={port}", f"--node-ip-address={HEAD_IP}",
             "--include-dashboard=false",
             f"--temp-dir={temp}", *common],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 120
        started_worker = False
        while True:
            if any(p.poll() is not None for p in procs):
                pytest.fail("ray start exited early:\n"
                            + (Path(temp) / "start.log").read_text(errors="replace")[-3000:])
            if not started_worker and _nodes_alive(address) >= 1:
                procs.append(subprocess.Popen(
                    [str(RAY), "start", f"--address={address}", *common],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                started_worker = True
            elif started_worker and _nodes_alive(address) >= 2:
                break
            if time.monotonic() > deadline:
                pytest.fail("the local Ray cluster did not come up in 120 s:\n"
                            + (Path(temp) / "start.log").read_text(errors="replace")[-3000:])
            time.sleep(1)
        yield address
    finally:
        _stop(procs)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 generated JPEGs in 3 classes, plus two files that cannot be used."""
    root = make_collection(tmp_path_factory.mktemp("raycoll") / "images", per_class=20)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "blue" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def local_bundle(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "bundle"
    build_index(images, out=out, model=TINY, shard_size=16)
    return out


def _assert_same_bundle(a: Path, b: Path) -> None:
    ba, bb = load_bundle(a), load_bundle(b)  # verifies file hashes against the manifest
    assert list(ba.items["id"]) == list(bb.items["id"])
    np.testing.assert_allclose(np.asarray(ba.embeddings), np.asarray(bb.embeddings),
                               atol=1e-6, rtol=0)
    fa = ba.failures.sort_values("id")[["id", "reason", "sha256"]].reset_index(drop=True)
    fb = bb.failures.sort_values("id")[["id", "reason", "sha256"]].reset_index(drop=True)
    assert fa.equals(fb)
    assert ba.manifest["counts"] == bb.manifest["counts"]
    assert ba.manifest["encoder"] == bb.manifest["encoder"]
    assert ba.manifest["index"] == bb.manifest["index"]


def test_ray_bundle_equals_local(ray_cluster: str, images: Path, local_bundle: Path,
                                 tmp_path: Path) -> None:
    out = tmp_path / "ray-bundle"
    result = CliRunner().invoke(main, [
        "-q", "build-index", str(images), "--out", str(out), "--model", TINY,
        "--engine", "ray", "--address", ray_cluster, "--ray-workers", "2",
        "--batch-size", "8", "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    manifest = json.loads(result.output.strip().splitlines()[-1])
    assert manifest["counts"]["embedded"] == 60
    assert sum(manifest["counts"]["by_reason"].values()) == 2  # recorded, not raised
    _assert_same_bundle(local_bundle, out)


def test_killed_ray_job_resumes_from_committed_shards(ray_cluster: str, images: Path,
                                                      local_bundle: Path, tmp_path: Path
                                                      ) -> None:
    out = tmp_path / "ray-resume"
    # The driver in its own process, so it can be killed like a crashed job would be.
    # One actor, batches of 4 at THROTTLE_S each: 62 images take about 4 s after start-up.
    code = ("import sys; from embedsearch import build_index; "
            "from embedsearch.engines.ray_engine import RayOptions; "
            f"build_index({str(images)!r}, out={str(out)!r}, model={TINY!r}, shard_size=16, "
            f"engine='ray', ray_options=RayOptions(address={ray_cluster!r}, num_workers=1, "
            "batch_size=4))")
    cmd = [sys.executable, "-c", code]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = out / "cache" / "cache.json"
    deadline = time.monotonic() + 180
    committed = 0
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if state.exists():
                committed = len(json.loads(state.read_text())["shards"])
                if committed >= 1:
                    break
            time.sleep(0.05)
    finally:
        driver.kill()  # SIGKILL: no cleanup runs in the driver
        log = driver.communicate()[0].decode(errors="replace")
    assert committed >= 1, f"no shard was committed before the deadline:\n{log[-3000:]}"
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
    shards = json.loads(state.read_text())["shards"]
    done = sum(s["records"] for s in shards)
    assert 0 < done < 62

    result = build_index(images, out=out, model=TINY, shard_size=16, engine="ray",
                         ray_options=RayOptions(address=ray_cluster, num_workers=2,
                                                batch_size=8))
    assert result.reused == done
    assert result.encoded == 62 - done
    _assert_same_bundle(local_bundle, out)
