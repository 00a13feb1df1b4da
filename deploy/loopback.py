"""A real federation on this machine: ``flower-superlink`` + N ``flower-supernode``.

``python -m deploy.loopback [--num-supernodes 2] [--run-config "preset='smoke'"] [--auth]
[--algorithm fedgkt|sl|splitfed-v1|splitfed-v2] [--task-poll-interval S]``

Every piece is a separate process speaking TLS over 127.0.0.1, as on real
devices: the SuperLink (Fleet + Control + Runtime APIs on one HTTPS port), one
SuperNode per partition (each with its own Flower home, Runtime API port and
``--node-config``), and ``flwr run`` submitting this app through a connection
declared in a private ``$FLWR_HOME/config.toml``. Certificates are generated
with ``deploy/gen_certs.sh``; with ``--auth`` the SuperLink requires SuperNode
authentication and the nodes' keys (``deploy/gen_node_keys.sh``) are
registered with ``flwr supernode register`` first. Everything started is
stopped at the end. Exit status 0 when the run finished as ``completed``.

``--algorithm`` chooses the app's components: ``fedgkt`` (default) submits
this repository (``pyproject.toml``: ``simulation.server_app:app`` /
``simulation.client_app:app``); ``sl``, ``splitfed-v1`` and ``splitfed-v2``
submit an app directory written by :func:`component_app` -- the repository's
``[tool.flwr.app.config]`` with the components of
:data:`flwr_gkt.app.flwr_local.COMPONENTS` ``["split"]`` -- and add
``split-mode`` to the run config. ``--task-poll-interval`` sets Flower's
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (seconds between a SuperExec's polls for
a new ClientApp / ServerApp task, default 1 s) for every process started: split
learning sends one message per mini-batch, and each message waits for it.

The :class:`Federation` class is what the integration tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import tomli_w

DEPLOY_DIR = Path(__file__).resolve().parent
APP_DIR = DEPLOY_DIR.parent
CONNECTION = "gkt-loopback"
#: ``--algorithm`` values: the app's components (a key of ``flwr_local.COMPONENTS``).
ALGORITHMS = {"fedgkt": "message", "sl": "split", "splitfed-v1": "split", "splitfed-v2": "split"}
#: Flower's environment variable: seconds between a SuperExec's task polls (default 1).
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def component_app(app_dir: Path, api: str) -> Path:
    """Write an app directory: this repository's app with ``api``'s components.

    Its ``pyproject.toml`` holds the repository's ``[tool.flwr.app.config]``
    (so ``--run-config`` works as with the repository) and the ServerApp /
    ClientApp of :data:`flwr_gkt.app.flwr_local.COMPONENTS` ``[api]``; the
    code comes from the environment's ``flwr_gkt`` (installed, or on
    ``PYTHONPATH``), not from the app bundle.
    """
    from flwr_gkt.app.flwr_local import COMPONENTS

    with open(APP_DIR / "pyproject.toml", "rb") as f:
        repo = tomllib.load(f)
    serverapp, clientapp = COMPONENTS[api]
    project = {
        "build-system": repo["build-system"],
        "project": {
            "name": f"flwr-gkt-{api}",
            "version": repo["project"]["version"],
            "description": f"flwr-gkt with the {api} components",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": repo["tool"]["flwr"]["app"]["publisher"],
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": repo["tool"]["flwr"]["app"]["config"],
                }
            }
        },
    }
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app_dir


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
    """Stop ``proc`` and its process group (children included)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def session_processes(sessions: set[int]) -> list[str]:
    """Command lines of the live (not zombie) processes in the given sessions."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) not in sessions:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # already dead, waiting to be reaped by its parent
            left.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except (OSError, ProcessLookupError, IndexError):
            continue
    return left


def algorithm_app(workdir: Path, algorithm: str, run_config: str) -> tuple[Path | None, str]:
    """The app directory and run config of ``--algorithm`` (``None``: this repository).

    The split-learning baselines get an app of :func:`component_app` in
    ``workdir / "app"`` and ``split-mode`` appended to ``run_config``.
    """
    if ALGORITHMS[algorithm] == "message":
        return None, run_config
    app = component_app(Path(workdir) / "app", ALGORITHMS[algorithm])
    return app, f"{run_config} split-mode={algorithm!r}".strip()


class Federation:
    """SuperLink + SuperNodes on 127.0.0.1 with TLS (and optional node auth).

    Parameters
    ----------
    workdir : Path
        Holds certificates, keys, Flower homes, logs; the ServerApp's working directory.
    num_supernodes : int
        Number of SuperNodes; node ``i`` gets ``partition-id=i``.
    auth : bool
        Require SuperNode authentication (keys registered before the nodes start).
    node_config : dict[str, str], optional
        Extra ``--node-config`` entries for every node (e.g. ``data-dir``);
        ``{i}`` in a value is replaced by the node's index (e.g.
        ``state-dir=/var/lib/gkt/node-{i}``).
    task_poll_interval : float, optional
        ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` of every process started
        (default: Flower's, 1 s).
    """

    def __init__(
        self,
        workdir: Path,
        num_supernodes: int = 2,
        auth: bool = False,
        node_config: dict[str, str] | None = None,
        task_poll_interval: float | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.num_supernodes = num_supernodes
        self.auth = auth
        self.node_config = node_config or {}
        self.port = free_port()
        self.certs = self.workdir / "certificates"
        self.keys = self.workdir / "keys"
        self.home = self.workdir / "flwr-home"
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        # This checkout's flwr_gkt first (an app of component_app has no code of its own).
        pythonpath = os.pathsep.join(filter(None, [str(APP_DIR), os.environ.get("PYTHONPATH")]))
        self.env = {
            **os.environ,
            "PATH": path,
            "PYTHONPATH": pythonpath,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if task_poll_interval is not None:
            if not 0.01 <= task_poll_interval <= 60:  # Flower's bounds (else its processes exit)
                raise ValueError(f"task_poll_interval {task_poll_interval} not in [0.01, 60] s")
            self.env[TASK_POLL_ENV] = str(task_poll_interval)

    # ------------------------------------------------------------- processes
    def _popen(
        self, cmd: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        with open(self.workdir / log_name, "ab") as out:
            return subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=env or self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this federation's connection."""
        return subprocess.run(
            ["flwr", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 90.0) -> None:
        """Certificates, keys, SuperLink, key registration, SuperNodes; wait until all are online."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        subprocess.run(
            ["bash", str(DEPLOY_DIR / "gen_certs.sh"), str(self.certs)],
            check=True,
            capture_output=True,
        )
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )
        cmd = [
            "flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ssl-ca-certfile",
            str(self.certs / "ca.crt"),
            "--ssl-certfile",
            str(self.certs / "server.pem"),
            "--ssl-keyfile",
            str(self.certs / "server.key"),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--database",
            str(self.workdir / "state.db"),
        ]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self.superlink = self._popen(cmd, "superlink.log")
        self._wait_healthy(timeout)
        if self.auth:
            subprocess.run(
                [
                    "bash",
                    str(DEPLOY_DIR / "gen_node_keys.sh"),
                    str(self.keys),
                    str(self.num_supernodes),
                ],
                check=True,
                capture_output=True,
            )
            for i in range(self.num_supernodes):
                res = self.flwr(
                    "supernode", "register", str(self.keys / f"node{i + 1}.pub"), CONNECTION
                )
                if res.returncode != 0:
                    raise RuntimeError(f"registering node{i + 1} failed: {res.stdout} {res.stderr}")
        for i in range(self.num_supernodes):
            self.start_supernode(i)
        self.wait_online(self.num_supernodes, timeout)

    def _wait_healthy(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.superlink is not None
            if self.superlink.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with {self.superlink.returncode}; "
                    f"see {self.workdir / 'superlink.log'}"
                )
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{self.port}/health", timeout=2, context=context
                ):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"SuperLink not healthy after {timeout}s")

    def supernode_command(self, i: int, key: Path | None = None) -> list[str]:
        """The ``flower-supernode`` command line of node ``i`` (``key``: another auth key)."""
        config = {
            "partition-id": str(i),
            "num-partitions": str(self.num_supernodes),
            **{k: v.replace("{i}", str(i)) for k, v in self.node_config.items()},
        }
        node_config = " ".join(
            f"{k}={v if v.lstrip('-').isdigit() else repr(v)}" for k, v in config.items()
        )
        cmd = [
            "flower-supernode",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--root-certificates",
            str(self.certs / "ca.crt"),
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
            "--isolation",
            "subprocess",
        ]
        if self.auth or key is not None:
            cmd += ["--auth-supernode-private-key", str(key or self.keys / f"node{i + 1}")]
        return cmd

    def start_supernode(self, i: int, key: Path | None = None) -> subprocess.Popen:
        """Start (or restart) SuperNode ``i`` with its own Flower home."""
        home = self.workdir / f"supernode-{i}"
        home.mkdir(exist_ok=True)
        proc = self._popen(
            self.supernode_command(i, key),
            f"supernode-{i}.log",
            {**self.env, "FLWR_HOME": str(home)},
        )
        self.supernodes[i] = proc
        return proc

    def kill_supernode(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``i`` and its ClientApp processes (default: SIGKILL, no goodbye)."""
        stop_process(self.supernodes[i], sig, grace=5)

    def online_nodes(self) -> list[dict]:
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=60)
        try:
            nodes = json.loads(res.stdout).get("nodes", [])
        except ValueError:
            return []
        return [n for n in nodes if str(n.get("status", "")).lower() == "online"]

    def wait_online(self, count: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.online_nodes()) >= count:
                return
            for i, proc in self.supernodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"supernode {i} exited with {proc.returncode}; "
                        f"see {self.workdir / f'supernode-{i}.log'}"
                    )
            time.sleep(1.0)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout}s")

    def submit(self, run_config: str, app: Path | None = None) -> subprocess.Popen:
        """``flwr run <app> <connection> --stream``, in the background (text stdout).

        ``app``: the app directory (default: this repository).
        """
        cmd = ["flwr", "run", str(app or APP_DIR), CONNECTION, "--stream"]
        if run_config:
            cmd += ["--run-config", run_config]
        return subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def status(self, run_id: int) -> str:
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(res.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return f"unknown ({res.stdout.strip()} {res.stderr.strip()})"

    def run_id(self, log: str) -> int | None:
        """The run id ``flwr run`` printed, if any."""
        match = re.search(r"run (\d+)", log)
        return int(match.group(1)) if match else None

    def run(
        self, run_config: str, timeout: float = 1800.0, app: Path | None = None
    ) -> tuple[str, str]:
        """Submit, stream the log to stdout, return ``(final status, log)``."""
        proc = self.submit(run_config, app)
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
            if time.monotonic() > deadline:
                stop_process(proc)
                break
        proc.wait()
        log = "".join(lines)
        run_id = self.run_id(log)
        return (self.status(run_id) if run_id else f"flwr run failed (exit {proc.returncode})"), log

    def process_groups(self) -> set[int]:
        """Session ids of every process this federation started (SuperLink, SuperNodes)."""
        procs = [p for p in [self.superlink, *self.supernodes.values()] if p is not None]
        return {p.pid for p in procs}

    def leftover_processes(self) -> list[str]:
        """Processes still alive in the sessions this federation started."""
        return session_processes(self.process_groups())

    def stop(self) -> None:
        """Stop every SuperNode and the SuperLink (with their children)."""
        for proc in self.supernodes.values():
            stop_process(proc)
        if self.superlink is not None:
            stop_process(self.superlink)

    def __enter__(self) -> Federation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.loopback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-supernodes", type=int, default=2)
    parser.add_argument("--run-config", default="preset='smoke'")
    parser.add_argument("--auth", action="store_true", help="require SuperNode authentication")
    parser.add_argument("--workdir", default="", help="default: a new temporary directory")
    parser.add_argument("--data-dir", default="", help="node-config data-dir of every node")
    parser.add_argument(
        "--algorithm",
        choices=tuple(ALGORITHMS),
        default="fedgkt",
        help="FedGKT (this repository's app) or a split-learning baseline (split_app's "
        "components, split-mode set in the run config)",
    )
    parser.add_argument(
        "--task-poll-interval",
        type=float,
        default=None,
        help=f"seconds between SuperExec task polls ({TASK_POLL_ENV}; Flower's default 1)",
    )
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gkt-deploy-"))
    node_config = {"data-dir": args.data_dir} if args.data_dir else {}
    app, run_config = algorithm_app(workdir, args.algorithm, args.run_config)
    with Federation(
        workdir, args.num_supernodes, args.auth, node_config, args.task_poll_interval
    ) as fed:
        print(
            f"SuperLink https://127.0.0.1:{fed.port}, {args.num_supernodes} SuperNodes online; "
            f"logs in {workdir}",
            flush=True,
        )
        status, _ = fed.run(run_config, app=app)
    print(f"run status: {status}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
