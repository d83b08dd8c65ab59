"""launch/slurm.sbatch on a real Slurm cluster: slurmctld and two slurmd nodes on this machine.

The module starts munged, slurmctld and two `slurmd -N` daemons from a temporary folder that holds everything
they use: a slurm.conf on free loopback ports, a munge key and socket of their own, state, spool, pid and log
files. Both nodes are 127.0.0.1 (NodeAddr); their names resolve nowhere, so a job only works if the script
takes the rendezvous address from Slurm. Jobs are submitted as a user would, from the repository root.
Every process started here is stopped by its pid at the end, whatever happens. Slurm comes from apt-get when
it is missing; a machine that cannot install or start it fails here with the reason, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.helpers import own_session

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "launch/slurm.sbatch"  # relative: submitted from the repository root, as the README shows
BIN = Path(sys.executable).parent  # the job runs train.py with the interpreter running these tests
NODES = ("spine1", "spine2")
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
# Lifetime cap of every daemon (seconds): a test run killed before its teardown leaves nothing behind for long.
DAEMON_LIFETIME = 900

# 1,600 training samples at a global batch of 32: 50 steps per epoch, 200 in all, a checkpoint every 10, so a
# job frozen at a checkpoint is mid-run with steps left to redo after the requeue.
TOTAL_STEPS = 200
TRAIN_FLAGS = ["--dataset", "moons", "--n-samples", "2000", "--epochs", "4", "--global-batch-size", "32",
               "--threads", "1", "--no-tensorboard", "--checkpoint-every-steps", "10", "--resume", "auto"]
TIGHT = {"rtol": 1.3e-6, "atol": 1e-6}
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}

pytestmark = [pytest.mark.timeout(240), pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else f"({path} missing)"


def install_slurm() -> None:
    """apt-get install slurm-wlm and munge when a binary is missing; pytest.fail with the reason if that fails."""
    if all(shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for b in SLURM_BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("Slurm is not installed, and installing it needs root and apt-get "
                    "(apt-get install -y slurm-wlm munge)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    try:
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=400)
        if r.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=200)
            r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"cannot install Slurm: {' '.join(e.cmd)} ran past {e.timeout} s")
    if r.returncode != 0:
        pytest.fail(f"cannot install Slurm: {' '.join(install)} exited {r.returncode}:\n{r.stdout[-2000:]}"
                    f"{r.stderr[-2000:]}")


def slurm_conf(folder: Path, munge_socket: Path) -> str:
    """Two nodes of 2 CPUs and 2 "GPUs" each: /dev/null and /dev/zero stand in as device files, so a job can
    be granted GPUs (SLURM_GPUS_ON_NODE) on a machine without any."""
    ports = [free_port() for _ in range(1 + len(NODES))]
    nodes = "\n".join(f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs=2 Gres=gpu:2 State=UNKNOWN"
                      for name, port in zip(NODES, ports[1:], strict=True))
    # cred_expire is also how long a requeued job waits before it may start again (default 120 s); a 1 s
    # scheduler interval starts it as soon as it may (default 60 s); MinJobAge 2 makes sbatch --wait poll every
    # 2 s (it backs off to 32 s otherwise).
    return f"""\
ClusterName=spinetest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
KillWait=2
MinJobAge=2
GresTypes=gpu
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]  # SLURM_CONF points at this cluster; also the marker of every process it runs
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)

    def start_daemon(self, name: str, *cmd: str) -> None:
        with open(self.folder / "log" / f"{name}.out", "wb") as log:
            self.daemons.append(subprocess.Popen(["timeout", "-k", "5", str(DAEMON_LIFETIME), *cmd],
                                                 cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True))

    def check_daemons_alive(self) -> None:
        for p in self.daemons:
            if p.poll() is not None:
                logs = "\n".join(f"--- {f.name}\n{tail(f)}" for f in sorted((self.folder / "log").iterdir()))
                pytest.fail(f"cannot start Slurm: {' '.join(p.args[4:])} exited {p.returncode}\n{logs}")

    def wait_until_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            self.check_daemons_alive()
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t")
            states = r.stdout.strip()
            if r.returncode == 0 and all(f"{n} idle" in states for n in NODES):
                return
            time.sleep(0.3)
        pytest.fail(f"cannot start Slurm: nodes not idle after {timeout} s: {states or r.stderr.strip()}\n"
                    f"{tail(self.folder / 'log' / 'slurmctld.log')}")

    def submit(self, train_flags: list[str], *options: str, env: dict[str, str] | None = None,
               wait: bool = False, timeout: float = 150) -> subprocess.CompletedProcess:
        """sbatch [--wait] OPTIONS launch/slurm.sbatch TRAIN_FLAGS, from the repository root."""
        return self.run("sbatch", *(["--wait"] if wait else []), "--parsable", "--time=5",
                        f"--output={self.folder}/job-%j.out", *options, SCRIPT, *train_flags, timeout=timeout, env=env)

    def job(self, job_id: str) -> dict[str, str]:
        r = self.run("scontrol", "show", "job", "-o", job_id)
        assert r.returncode == 0, r.stderr
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait_for(self, job_id: str, until, what: str, timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.05)
        raise AssertionError(f"job {job_id}: not {what} after {timeout} s: {self.job(job_id)}\n"
                             f"{tail(self.output(job_id))}")

    def wait_for_all(self, job_ids: list[str], timeout: float = 60) -> dict[str, dict[str, str]]:
        """Each job's record as first seen ended: polled together, since an ended job's record is dropped after
        MinJobAge seconds."""
        ended: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + timeout
        while len(ended) < len(job_ids):
            assert time.monotonic() < deadline, f"jobs {sorted(set(job_ids) - set(ended))} not ended after {timeout} s"
            for job_id in set(job_ids) - set(ended):
                if (info := self.job(job_id))["JobState"] in TERMINAL_STATES:
                    ended[job_id] = info
            time.sleep(0.05)
        return ended

    def output(self, job_id: str) -> Path:
        return self.folder / f"job-{job_id}.out"

    def output_text(self, job_id: str) -> str:
        """The job's output so far ("" before Slurm has created the file)."""
        path = self.output(job_id)
        return path.read_text() if path.exists() else ""

    def processes(self, **env_match: str) -> list[int]:
        """Pids of this cluster's processes (SLURM_CONF is ours) whose environment has every NAME=VALUE given."""
        wanted = {f"SLURM_CONF={self.env['SLURM_CONF']}", *(f"{k}={v}" for k, v in env_match.items())}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = set((entry / "environ").read_bytes().decode(errors="replace").split("\0"))
            except OSError:  # gone, or not ours to read
                continue
            if wanted <= environ:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Cancel every job, stop the daemons by pid, then SIGKILL whatever of ours is left (job steps)."""
        try:
            queued = self.run("squeue", "-h", "-o", "%A", timeout=10).stdout.split()
            if queued:
                self.run("scancel", *queued, timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%A", timeout=10).stdout.strip():
                    time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass  # the controller is down already: the pids below still go
        for p in reversed(self.daemons):
            if p.poll() is None:
                p.terminate()
        for p in self.daemons:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    install_slurm()
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir()
    munge_key, munge_socket = folder / "munge.key", folder / "munge.socket"
    munge_key.write_bytes(os.urandom(1024))  # this cluster's own key: the machine's munge setup is left alone
    munge_key.chmod(0o400)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, munge_socket))
    (folder / "gres.conf").write_text("Name=gpu File=/dev/null\nName=gpu File=/dev/zero\n")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    c = Cluster(folder, {**os.environ, "PATH": path, "SLURM_CONF": str(conf)})  # absolute: slurmctld changes dir
    try:
        # -f: past munged's permission checks, written for /etc/munge and /run/munge, not a temporary folder.
        c.start_daemon("munged", "munged", "-F", "-f", f"--key-file={munge_key}", f"--socket={munge_socket}",
                       f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed",
                       f"--log-file={folder}/log/munged.log")
        deadline = time.monotonic() + 20
        while not munge_socket.exists() and time.monotonic() < deadline:
            c.check_daemons_alive()
            time.sleep(0.1)
        c.start_daemon("slurmctld", "slurmctld", "-D", "-f", str(conf))
        for name in NODES:
            c.start_daemon(f"slurmd-{name}", "slurmd", "-D", "-N", name, "-f", str(conf))
        c.wait_until_nodes_idle()
        yield c
    finally:
        c.stop()


def train_flags(tmp: Path, run_name: str) -> list[str]:
    return [*TRAIN_FLAGS, "--runs-dir", str(tmp / "runs"), "--checkpoints-dir", str(tmp / "ckpt"),
            "--run-name", run_name]


def weights(tmp: Path, run_name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp / "ckpt" / run_name / "last.pt", weights_only=True)["model"]


def summary(tmp: Path, run_name: str) -> dict:
    return json.loads((tmp / "runs" / run_name / "summary.json").read_text())


def newest_checkpoint_step(tmp: Path, run_name: str) -> int:
    names = (f.name for f in (tmp / "ckpt" / run_name).glob("step-*.pt"))
    return max((int(m[1]) for name in names if (m := re.fullmatch(r"step-(\d+)\.pt", name))), default=0)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> tuple[Path, str]:
    """One two-node job, `sbatch --wait`, and beside it the same run under torchrun --standalone at world 2."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    standalone = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "train.py",
                  *train_flags(tmp, "torchrun")]
    with own_session(standalone, cwd=ROOT) as torchrun:
        job = cluster.submit(train_flags(tmp, "slurm"), "--nodes=2", wait=True)
        torchrun_out, _ = torchrun.communicate(timeout=150)
    assert torchrun.returncode == 0, torchrun_out[-3000:]
    job_id = job.stdout.strip().split(";")[0]
    assert job.returncode == 0, f"{job.stderr}\n{tail(cluster.output(job_id), 40)}"
    return tmp, job_id


def test_two_node_job_matches_torchrun_standalone(cluster, uninterrupted):
    tmp, job_id = uninterrupted
    out = cluster.output(job_id).read_text()
    assert f"job {job_id} attempt 0: 2 node(s) x 1 rank(s)" in out  # one rank per node: the CPU Slurm granted
    job, ref = summary(tmp, "slurm"), summary(tmp, "torchrun")
    assert job["world_size"] == ref["world_size"] == 2
    assert job["global_step"] == ref["global_step"] == TOTAL_STEPS
    assert len(set(job["replica_checksums"])) == 1  # both ranks hold the same weights
    a, b = weights(tmp, "slurm"), weights(tmp, "torchrun")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TIGHT, msg=name)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # ended meanwhile
        return []


def freeze_training(cluster: Cluster, job_id: str) -> None:
    """SIGSTOP the job's torchrun agents and train.py ranks, on both nodes: the run stops exactly where it is.

    The run's training part takes seconds, so killing it "mid-run" by timing alone would race its end;
    frozen, it is certainly mid-run when the kill or the signal arrives. Slurm sends SIGCONT before it kills.
    """
    pids = [pid for pid in cluster.processes(SLURM_JOB_ID=job_id) if any(a.endswith("train.py") for a in cmdline(pid))]
    assert len(pids) >= 4, f"expected 2 agents and 2 ranks of job {job_id}, found pids {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # a checkpoint write in progress stays half-done: the resume must cope
    deadline = time.monotonic() + 10
    while not all(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for pid in pids):
        assert time.monotonic() < deadline, f"job {job_id}: processes {pids} not stopped after 10 s"
        time.sleep(0.02)


def test_requeued_job_resumes_and_ends_bit_identical(cluster, uninterrupted, tmp_path):
    """A job step SIGKILLed mid-run fails the job; `scontrol requeue` runs it again, from the same launch line,
    to the weights of the uninterrupted job."""
    ref_tmp, _ = uninterrupted
    submitted = cluster.submit(train_flags(tmp_path, "requeued"), "--nodes=2")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]

    running = cluster.wait_for(job_id, lambda j: newest_checkpoint_step(tmp_path, "requeued") > 0
                               or j["JobState"] in TERMINAL_STATES, "at a checkpoint")
    assert running["JobState"] == "RUNNING", tail(cluster.output(job_id), 40)
    freeze_training(cluster, job_id)
    killed_at = newest_checkpoint_step(tmp_path, "requeued")
    assert 0 < killed_at < TOTAL_STEPS and not (tmp_path / "runs" / "requeued" / "summary.json").exists()
    r = cluster.run("scancel", "--signal=KILL", f"{job_id}.0")
    assert r.returncode == 0, r.stderr
    failed = cluster.wait_for(job_id, lambda j: j["JobState"] in TERMINAL_STATES, "ended")
    assert failed["JobState"] == "FAILED" and failed["ExitCode"] != "0:0", failed
    r = cluster.run("scontrol", "requeue", job_id)
    assert r.returncode == 0, r.stderr

    done = cluster.wait_for(job_id, lambda j: j["Restarts"] == "1" and j["JobState"] in TERMINAL_STATES,
                            "finished after the requeue")
    out = cluster.output(job_id).read_text()  # --open-mode=append: both attempts' output
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", tail(cluster.output(job_id), 40)
    for attempt in range(2):
        assert f"job {job_id} attempt {attempt}: 2 node(s) x 1 rank(s)" in out
    assert summary(tmp_path, "requeued")["global_step"] == TOTAL_STEPS
    resumed, straight = weights(tmp_path, "requeued"), weights(ref_tmp, "slurm")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), "requeued job is not bit-identical"


def test_unknown_train_flag_fails_the_job_with_train_py_one_line_error(cluster, tmp_path):
    job = cluster.submit(["--no-such-flag", "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir",
                          str(tmp_path / "ckpt")], "--nodes=2", wait=True)
    out = cluster.output(job.stdout.strip().split(";")[0]).read_text()
    assert job.returncode != 0, out  # sbatch --wait exits with the job's exit code
    assert out.count("train.py: error: unrecognized arguments: --no-such-flag\n") == 1  # rank 0's one line
    assert re.search(r"exitcode\s*:\s*2\b", out), out[-3000:]  # torchrun's summary: train.py exited 2
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()


def test_node_count_that_does_not_match_the_allocation_is_a_clear_error(cluster, tmp_path):
    # NNODES says what the job expects; an allocation of another size stops it before anything is launched.
    job = cluster.submit(train_flags(tmp_path, "mismatch"), "--nodes=2", env={"NNODES": "3"}, wait=True)
    out = cluster.output(job.stdout.strip().split(";")[0]).read_text()
    assert job.returncode == 2, out
    assert out == "slurm.sbatch: error: NNODES=3 but Slurm allocated 2 node(s) (spine[1-2]): submit with --nodes=3\n"
    assert not (tmp_path / "runs").exists()


# Prints its command line; with STUB_HOLD_FIRST_ATTEMPT set it then holds the first attempt, as training would.
STUB_TORCHRUN = """#!/usr/bin/env bash
echo "node $SLURM_NODEID: torchrun $*"
if [[ -n ${STUB_HOLD_FIRST_ATTEMPT:-} && ${SLURM_RESTART_COUNT:-0} == 0 ]]; then exec sleep 60; fi
"""


@pytest.fixture
def stub_bin(tmp_path) -> Path:
    """A PYTHON_BIN_DIR whose torchrun is the stub above. The cluster and the allocations stay real."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").symlink_to(sys.executable)  # the script picks its free port with it
    (stub / "torchrun").write_text(STUB_TORCHRUN)
    (stub / "torchrun").chmod(0o755)
    return stub


def launch_lines(out: str) -> list[str]:
    return sorted(line for line in out.splitlines() if line.startswith("node "))


def test_ranks_per_node_follow_the_gpus_else_the_cpus_granted(cluster, stub_bin):
    """What the script hands torchrun, for each kind of allocation (this machine has no GPU to train on)."""
    # sbatch options -> (ranks per node, --threads per rank)
    cases = {(): (1, 1), ("--cpus-per-task=2",): (2, 1), ("--gres=gpu:2",): (2, 1),
             ("--gres=gpu:1", "--cpus-per-task=2"): (1, 2), ("--gpus-per-node=2", "--cpus-per-task=2"): (2, 1)}
    jobs = {}
    for options in cases:  # submitted together: those that fit run side by side on the same two nodes
        r = cluster.submit(["--epochs", "3"], "--nodes=2", *options, env={"PYTHON_BIN_DIR": str(stub_bin)})
        assert r.returncode == 0, r.stderr
        jobs[options] = r.stdout.strip().split(";")[0]
    ended = cluster.wait_for_all(list(jobs.values()))
    endpoints = set()
    for options, (ranks, threads) in cases.items():
        job_id = jobs[options]
        out = cluster.output(job_id).read_text()
        assert ended[job_id]["JobState"] == "COMPLETED", f"{options}: {out}"
        assert f"2 node(s) x {ranks} rank(s)" in out, f"{options}: {out}"
        launches = launch_lines(out)
        assert len(launches) == 2, f"{options}: {out}"
        for node_rank, line in enumerate(launches):
            assert line.startswith(f"node {node_rank}: torchrun --nnodes=2 --nproc-per-node={ranks} "
                                   f"--node-rank={node_rank} --rdzv-id=slurm-{job_id} --rdzv-backend=c10d "
                                   "--rdzv-endpoint=127.0.0.1:"), line  # NodeAddr: the names resolve nowhere
            assert line.endswith(f"/train.py --threads {threads} --epochs 3"), line
        endpoints |= {line.split("--rdzv-endpoint=")[1].split()[0] for line in launches}
    assert len(endpoints) == len(cases)  # every job its own rendezvous port


def test_time_limit_signal_requeues_the_job_with_the_same_launch_line(cluster, stub_bin):
    """--signal=B:USR1@60: Slurm signals the batch script before the time limit; the script requeues the job
    and the next attempt launches exactly the same training command (only the rendezvous port differs)."""
    r = cluster.submit(["--resume", "auto", "--epochs", "3"], "--nodes=2",
                       env={"PYTHON_BIN_DIR": str(stub_bin), "STUB_HOLD_FIRST_ATTEMPT": "1"})
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    cluster.wait_for(job_id, lambda j: len(launch_lines(cluster.output_text(job_id))) == 2, "launched")
    r = cluster.run("scancel", "--batch", "--signal=USR1", job_id)  # what Slurm sends 60 s before the limit
    assert r.returncode == 0, r.stderr
    done = cluster.wait_for(job_id, lambda j: j["Restarts"] == "1" and j["JobState"] in TERMINAL_STATES,
                            "requeued and finished", timeout=60)
    out = cluster.output(job_id).read_text()
    assert done["JobState"] == "COMPLETED", out
    assert f"slurm.sbatch: time limit near: requeueing job {job_id}, which resumes from the last checkpoint" in out
    launches = launch_lines(out)  # sorted: node 0's of both attempts, then node 1's
    assert len(launches) == 4, out
    without_port = [re.sub(r"--rdzv-endpoint=\S+", "", line) for line in launches]
    assert without_port[0] == without_port[1] and without_port[2] == without_port[3], launches
