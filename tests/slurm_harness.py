"""A throw-away Slurm cluster on this machine for tests: `slurmctld` plus one `slurmd` per fake node.

Debian's Slurm 22.05 is built with MULTIPLE_SLURMD, so `n1`, `n2`, ... are several `slurmd -N nX`
on one host, each on its own port, all with NodeAddr=127.0.0.1. No cgroups (proctrack/linuxproc,
task/none), no munge (auth/none), no systemd, nothing under /etc: config, state, spool and logs
live in one temporary folder and clients find it through SLURM_CONF. The daemons run in the
foreground (-D) as our children, so we know their PIDs and stop exactly those.

    python tests/slurm_harness.py        # bring a 2-node cluster up, show sinfo, take it down

Tests use `slurm_cluster_or_skip()`: it skips (with the reason) unless GRISTMILL_SLURM_TESTS=1;
with the switch on, it installs the Debian packages when they are missing (root + apt-get) and starts
the cluster, and any failure to do so fails the tests: asked-for tests never turn into skips.

Nothing the cluster started outlives it: `cancel(job)` (also used on a failed or timed-out job) and
`stop()` wait until no process of the job is left (`slurmstepd`, the ranks, a Ray head and its
workers), killing what does not exit. Such processes are found by the SLURM_CONF in their
environment, which is this cluster's own file, so other clusters on the host are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ENV_SWITCH = "GRISTMILL_SLURM_TESTS"
PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
DAEMONS = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun", "sinfo", "scancel"]


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; tests turn this into a skip."""


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (bound together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_installed() -> None:
    """Install Debian's Slurm packages when the binaries are missing; SlurmUnavailable if we can't."""
    if all(shutil.which(b) for b in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and cannot be (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:  # stale package lists: update once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not all(shutil.which(b) for b in DAEMONS):
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-500:]}")


def slurm_conf(root: Path, nodes: int, cpus: int, ports: list[int]) -> str:
    """slurm.conf text: auth/none, no cgroups, a `debug` partition over n1..n<nodes>."""
    host = socket.gethostname().split(".")[0]
    node_lines = [
        f"NodeName=n{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[i]} "
        f"CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN"
        for i in range(1, nodes + 1)
    ]
    return "\n".join(
        [
            "ClusterName=gristmill",
            "MailProg=/bin/true",
            f"SlurmctldHost={host}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "AuthInfo=cred_expire=10",  # a requeued job is eligible again after ~11 s, not 121 s
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ports[0]}",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={root}/run/slurmctld.pid",
            f"SlurmdPidFile={root}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "KillWait=10",
            "MinJobAge=600",
            *node_lines,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ]
    )


class SlurmCluster:
    """slurmctld + `nodes` slurmds under `root`; use as a context manager or call start()/stop()."""

    def __init__(self, nodes: int = 2, cpus: int = 2, root: Path | None = None):
        self.nodes, self.cpus = nodes, cpus
        # short path: slurmd puts unix sockets in its spool dir (108-byte limit)
        self.root = Path(root or tempfile.mkdtemp(prefix="gm-slurm-"))
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        """Write the config, start the daemons, wait until every node is idle (SlurmUnavailable if not)."""
        for sub in ("etc", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.root, self.nodes, self.cpus, free_ports(self.nodes + 1)))
        try:
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            for i in range(1, self.nodes + 1):
                self._spawn(f"slurmd-n{i}", ["slurmd", "-D", "-N", f"n{i}", "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / "log" / f"{name}.stdout", "wb") as out:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{dead} exited at start; see {self.root / 'log'}")
            out = self.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], check=False).stdout.strip()
            if out == str(self.nodes):
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"nodes not idle after {timeout} s; see {self.root / 'log'}")

    def stop(self) -> None:
        """Cancel every job and wait for its processes, stop exactly our daemons (slurmds first), kill
        whatever the jobs left behind, and remove the folder."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            for job in self.job_ids():
                self.cancel(job)
        for name in sorted(self.procs, key=lambda n: n == "slurmctld"):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        left = end_processes(self.processes())
        shutil.rmtree(self.root, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the test cluster survived SIGKILL: {left}")

    def processes(self, job: str | None = None) -> dict[int, str]:
        """pid -> command line of the processes this cluster's jobs started (of one job if given): the
        ones whose environment names our SLURM_CONF, less our own daemons."""
        ours = {p.pid for p in self.procs.values()} | {os.getpid()}
        found = processes_with_env("SLURM_CONF", str(self.conf))
        if job is not None:
            found = {
                pid: cmd
                for pid, cmd in found.items()
                if cmd.startswith(f"slurmstepd: [{job}.") or _env_of(pid).get("SLURM_JOB_ID") == job
            }
        return {pid: cmd for pid, cmd in found.items() if pid not in ours}

    def cancel(self, job: str, timeout: float = 30) -> None:
        """scancel the job, then wait until the controller and this host have no trace of it running:
        its steps and every process they started gone (SIGKILL after `timeout`)."""
        self.run(["scancel", job], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if job not in self.job_ids() and not self.processes(job):
                return
            time.sleep(0.3)
        self.run(["scancel", "--signal=KILL", "--full", job], check=False)
        end_processes(self.processes(job))

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        kw.setdefault("env", self.env)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job_ids(self) -> list[str]:
        """Jobs the controller still lists as pending, running or completing."""
        out = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout
        return out.split()

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id."""
        cmd = ["sbatch", "--parsable", *args]
        return self.run(cmd, env={**self.env, **(env or {})}, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...); {} once forgotten."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout.strip()
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job's state is one of `states`; on timeout cancel the job (waiting for its
        processes to end), then TimeoutError with the state it was in."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        self.cancel(job_id)
        raise TimeoutError(
            f"job {job_id} not in {states} after {timeout} s (cancelled): {info.get('JobState')}"
        )

    def log_tail(self, n: int = 3000) -> str:
        """The end of every daemon log, for failure messages."""
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)


def slurm_cluster_or_skip(nodes: int = 2, cpus: int = 2) -> SlurmCluster:
    """A started cluster. Without GRISTMILL_SLURM_TESTS=1 the test is skipped; with it, a cluster
    that cannot be installed or started fails the test with the reason."""
    import pytest

    if os.environ.get(ENV_SWITCH) != "1":
        pytest.skip(f"Slurm tests are off: set {ENV_SWITCH}=1 to run them (4-7 minutes on 2 cores)")
    if os.geteuid() != 0:
        pytest.fail(f"{ENV_SWITCH}=1 but Slurm tests need root: slurmd runs as root in this harness")
    try:
        ensure_installed()
        cluster = SlurmCluster(nodes=nodes, cpus=cpus)
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"{ENV_SWITCH}=1 but a local Slurm cluster cannot run here: {exc}")
    return cluster


def _env_of(pid: int) -> dict[str, str]:
    """A process's environment ({} when it is gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def processes_with_env(key: str, value: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment has key=value."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if _env_of(pid).get(key) != value:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found[pid] = cmd
    return found


def end_processes(procs: dict[int, str], grace: float = 10) -> dict[int, str]:
    """TERM, then KILL after `grace` s, each of `procs`; returns those still alive after that."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in procs):
            time.sleep(0.1)
    return {pid: cmd for pid, cmd in procs.items() if _alive(pid)}


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


if __name__ == "__main__":
    ensure_installed()
    with SlurmCluster() as c:
        print(c.run(["sinfo"]).stdout)
        print("daemons:", {n: p.pid for n, p in c.procs.items()})
