"""A private two-node Slurm cluster on this machine, for tests: munged, slurmctld, and two slurmd daemons
(`slurmd -N n1`, `slurmd -N n2`) that are two nodes on one host. Every file lives in one directory;
every daemon is stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


class SlurmCluster:
    def __init__(self, root: Path, *, cpus_per_node: int = 2, memory_mb: int = 4000):
        self.root = root
        self.cpus = cpus_per_node
        self.memory = memory_mb
        self.pids: dict[str, int] = {}
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- files --------------------------------------------------------------------------------------

    def _write_files(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ctld_port, n1_port, n2_port = _free_port(), _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=bigsft-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n1 NodeAddr=127.0.0.1 Port={n1_port} CPUs={self.cpus} RealMemory={self.memory} State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port={n2_port} CPUs={self.cpus} RealMemory={self.memory} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    # -- daemons ------------------------------------------------------------------------------------

    def _start(self, name: str, cmd: list[str], pid_file: Path) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 (lives as long as the daemon)
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            if pid_file.is_file() and pid_file.read_text().strip():
                self.pids[name] = int(pid_file.read_text().strip())
                return
            if proc.poll() is not None and proc.returncode != 0:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start: {' '.join(cmd)}\n{self.log(name)}")

    def log(self, name: str) -> str:
        out = []
        for f in sorted((self.root / "log").glob(f"{name}*")):
            out.append(f"== {f.name}\n{f.read_text()[-3000:]}")
        return "\n".join(out)

    def start(self) -> SlurmCluster:
        self._write_files()
        r = self.root
        self._start("munged", ["munged", "--force", f"--key-file={r}/munge/munge.key", f"--socket={r}/munge/munge.socket",
                               f"--pid-file={r}/run/munged.pid", f"--log-file={r}/log/munged.log",
                               f"--seed-file={r}/munge/munged.seed"], r / "run" / "munged.pid")
        self._start("slurmctld", ["slurmctld", "-i", "-f", str(self.conf)], r / "run" / "slurmctld.pid")
        for node in ("n1", "n2"):
            self._start(f"slurmd-{node}", ["slurmd", "-N", node, "-f", str(self.conf)], r / "run" / f"slurmd-{node}.pid")
        self.wait_nodes_idle()
        return self

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return proc

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            if states.count("idle") == 2:
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle: {states}\n{self.log('slurm')}")

    def job_state(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", job_id, "-o", check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                 timeout: float = 900) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s")

    def skip_requeue_delay(self, job_id: str, timeout: float = 300) -> None:
        """Slurm holds a requeued job for two minutes (BeginTime); a test need not wait them out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                # Slurm's own delay covers what a test must wait for by hand: the old incarnation finishing on
                # every node, and a second past it (slurmd refuses a credential issued in the second it revoked
                # the job's old one: "Job credential revoked", and the job fails instead of starting).
                self.wait_nodes_idle()
                time.sleep(2.5)
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
                return
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
                return
            time.sleep(0.5)

    def stop(self) -> None:
        for name in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
