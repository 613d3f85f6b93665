"""One run on two "machines": two `torchrun --nnodes 2 --nproc-per-node 1` launchers on this
machine joining through a c10d rendezvous on localhost, as two cluster nodes would (each node
process is local rank 0 of its node; the global ranks are given by the rendezvous). A DDP LoRA
run and an FSDP full fine-tuning run give the loss curves of one process with the same global
batch, only global rank 0 writes the run directory (records, checkpoints, artefacts), and a run
directory the nodes do not share is refused before the first step.

The jobs and tolerances are test_distributed's (one launch of 2 processes on one node): across
nodes the processes, the data split and the collectives are the same, only the rendezvous
differs. LOSS_ABS = 1e-4: two processes reduce gradients in another order and run GEMMs on half
the rows, so losses differ in their last bits (~1e-6 measured), while a wrong token
normalisation across ranks moves them by ~1e-2. WEIGHT_ABS = 1e-3: Adam's division by
sqrt(v) + eps turns the rounding noise of near-zero gradient components into updates up to
~1e-4, while a misplaced shard or a missing reduction moves weights by ~lr = 1e-2 or more."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import LOSS_ABS, WEIGHT_ABS, _assert_same_metrics, _ckpt, _curves, job

REPO = Path(__file__).resolve().parents[2]

# Each node process logs the paths it opens for writing, creates, renames or removes under the
# test's folder (Python's audit events, which the loop's atomic writes, TensorBoard and the
# record writer all raise). It works in a folder of its own node (node0, node1: a local disk),
# where a run with a relative --out must fail (the nodes do not share it), then runs the jobs of
# test_distributed in `runs` (shared by both, as a cluster's shared filesystem is).
SCRIPT = """
import json, os, sys
sys.path[:0] = [{tests!r}, {tests!r} + "/training"]
root = {root!r}
writes = []

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        written = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        paths = [path] if written else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate"):
        paths = [args[0]]
    elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
        paths = [args[0], args[1]]
    else:
        return
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(p))
            if path.startswith(root) and not path.startswith(root + "/logs"):
                writes.append([event, os.path.relpath(path, root)])

sys.addaudithook(audit)
import loralab.training.distributed as distributed
from loralab.errors import UserError
from test_distributed import job
os.chdir(root + "/node" + os.environ["GROUP_RANK"])
distributed.SHARED_WAIT_SECONDS = 2.0  # not NFS: a file rank 0 wrote is seen at once
try:
    job("runs/own-disk", "lora")
    not_shared = None
except UserError as e:
    not_shared = str(e)
job(root + "/runs/lora", "lora")
job(root + "/runs/full", "full")
env = {{k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE",
                                   "LOCAL_WORLD_SIZE")}}
with open(root + "/logs/rank" + os.environ["RANK"] + ".json", "w") as f:
    json.dump({{"env": env, "writes": writes, "not_shared": not_shared}}, f)
"""


def free_port() -> int:
    """A TCP port nothing listens on now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(script: Path, cwd: Path, timeout: float = 600) -> None:
    """Run `script` as a 2-node job: two torchrun launchers (one process each) started
    together, rendezvous c10d on localhost:<free port> (the launcher that binds the port hosts
    the store, the other connects; the rendezvous numbers the nodes, `--node-rank` is only read
    by the static rendezvous); both must exit 0."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LORALAB_FAULT_NAN_AT_STEP", None)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-id", "multinode-test",
         "--rdzv-endpoint", f"localhost:{port}", "--rdzv-conf", "join_timeout=120",
         "--max-restarts", "0", str(script)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in (0, 1)]
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for node, (proc, out) in enumerate(zip(nodes, outputs, strict=True)):
        assert proc.returncode == 0, f"node {node}:\n{out[-3000:]}"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Path:
    """One 2-node launch running SCRIPT; its folder (runs, node0, node1, logs/rank<R>.json)."""
    root = tmp_path_factory.mktemp("nodes")
    for sub in ("logs", "node0", "node1"):
        (root / sub).mkdir()
    script = root / "job.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), root=str(root)))
    launch_two_nodes(script, REPO)
    return root


@pytest.mark.slow
def test_two_node_ddp_lora_matches_single_process(tmp_path, two_nodes):
    single = job(str(tmp_path / "single"), "lora")
    ddp = json.loads((two_nodes / "runs" / "lora" / "record.json").read_text())
    assert ddp["env"]["world_size"] == 2 and ddp["env"]["parallel"] == "ddp"
    assert len(_curves(ddp, "train_loss")) == 4
    assert _curves(ddp, "train_loss") == pytest.approx(_curves(single, "train_loss"),
                                                       abs=LOSS_ABS)
    assert _curves(ddp, "val_loss") == pytest.approx(_curves(single, "val_loss"), abs=LOSS_ABS)
    _assert_same_metrics(ddp["metrics"]["validation"], single["metrics"]["validation"])


@pytest.mark.slow
def test_two_node_fsdp_full_matches_single_process(tmp_path, two_nodes):
    """FSDP over the two nodes (keep_best: the best checkpoint is written by rank 0 and read
    back by both): the same curves, metrics and gathered checkpoint as one process."""
    single_dir = tmp_path / "single"
    single = job(str(single_dir), "full")
    run = two_nodes / "runs" / "full"
    fsdp = json.loads((run / "record.json").read_text())
    assert fsdp["env"]["world_size"] == 2 and fsdp["env"]["parallel"] == "fsdp"
    assert len(_curves(fsdp, "train_loss")) == 4
    assert _curves(fsdp, "train_loss") == pytest.approx(_curves(single, "train_loss"),
                                                        abs=LOSS_ABS)
    assert _curves(fsdp, "val_loss") == pytest.approx(_curves(single, "val_loss"), abs=LOSS_ABS)
    _assert_same_metrics(fsdp["metrics"]["validation"], single["metrics"]["validation"])
    a, b = _ckpt(single_dir), _ckpt(run)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=WEIGHT_ABS, rtol=0)


def _logs(root: Path) -> dict[int, dict]:
    return {r: json.loads((root / "logs" / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.mark.slow
def test_only_global_rank_zero_writes_the_run_directory(two_nodes):
    """Both node processes are local rank 0 of their node; only global rank 0 writes: record,
    checkpoints, TensorBoard, saved adapter and model. The other node writes nothing, not even
    on its own disk."""
    logs = _logs(two_nodes)
    assert [logs[r]["env"]["LOCAL_RANK"] for r in (0, 1)] == ["0", "0"]
    assert {logs[r]["env"]["GROUP_RANK"] for r in (0, 1)} == {"0", "1"}  # two nodes
    assert all(logs[r]["env"]["WORLD_SIZE"] == "2" for r in (0, 1))
    assert logs[1]["writes"] == []
    written = {p for _, p in logs[0]["writes"]}
    # the hook sees what it must (the test can fail): the record and checkpoint of each run
    for run in ("lora", "full"):
        assert f"runs/{run}/record.json" in written
        assert f"runs/{run}/checkpoints/last.pt" in written


@pytest.mark.slow
def test_run_directory_not_shared_by_the_nodes_is_refused(two_nodes):
    """A run directory on each node's own disk (a relative --out, each node in its own folder):
    every process stops with a UserError right after rank 0 wrote the record, before any
    training step, instead of resuming or restoring the best checkpoint on rank 0's node only."""
    logs = _logs(two_nodes)
    for r in (0, 1):
        assert "1 of 2 processes cannot read runs/own-disk/record.json" in logs[r]["not_shared"]
    node0 = logs[0]["env"]["GROUP_RANK"]
    record = json.loads((two_nodes / f"node{node0}" / "runs/own-disk/record.json").read_text())
    assert record["status"] == "running" and record["curves"]["train_loss"] == []
    other = next(p for p in two_nodes.glob("node*") if p.name != f"node{node0}")
    assert list(other.iterdir()) == []
