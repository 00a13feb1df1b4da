"""Run the app with ``flwr run`` on a private local simulation SuperLink.

``python -m flwr_gkt.app.flwr_local [--num-supernodes N] [--run-config "k=v ..."]``

What it does, so that nothing leaks into the user's Flower setup:

1. creates a Flower home (``--flwr-home``, default a temporary directory) whose
   ``config.toml`` declares one connection, ``local-simulation``, pointing at
   a SuperLink on a free loopback port;
2. starts that ``flower-superlink --simulation`` itself (runtime dependency
   installation off: the app runs in this virtual environment, offline);
3. runs ``flwr run <app> local-simulation --stream`` with the run config and
   the simulation settings (``--federation-config``);
4. asks the SuperLink for the run's final status (``flwr ls``; ``flwr run``
   exits 0 even when the run failed) and stops the SuperLink and its children.

Exit status 0 only when the run finished as ``finished:completed``.

:func:`run_config_app` is what ``python -m simulation`` (``flwr-gkt-sim``)
does by default: it writes a Flower app directory whose ``pyproject.toml``
holds the fully resolved config and the components of the chosen algorithm,
and runs it in the same way, streaming the ServerApp's log as it comes. The
SuperLink gets ``FLWR_GKT_TRUSTED_RUN_CONFIG=1`` in its environment: the whole
federation runs on this machine from this user's config, so the simulated
nodes may take their node-side settings from the run config (see
:func:`flwr_gkt.app.task.run_config_trusted`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import tomli_w

from flwr_gkt import __version__
from flwr_gkt.config import RunConfig

from .task import TRUST_ENV

#: The folder holding the ``flwr_gkt`` package this module belongs to.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
#: The repository root (a Flower app: ``[tool.flwr.app]`` in its pyproject.toml).
APP_DIR = PACKAGE_ROOT

#: ServerApp and ClientApp of each algorithm, for :func:`write_app`.
COMPONENTS = {
    "message": ("flwr_gkt.app.server_app:app", "flwr_gkt.app.client_app:app"),
    "legacy": ("flwr_gkt.app.legacy_app:server_app", "flwr_gkt.app.legacy_app:client_app"),
    "fedavg": ("flwr_gkt.app.fedavg_app:server_app", "flwr_gkt.app.fedavg_app:client_app"),
    "fedagg": ("flwr_gkt.app.fedagg_app:server_app", "flwr_gkt.app.fedagg_app:client_app"),
    "split": ("flwr_gkt.app.split_app:server_app", "flwr_gkt.app.split_app:client_app"),
}


#: Ray settings of the simulation SuperLink's processes (a variable the environment
#: sets wins). ``RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES`` caps Ray's object store at
#: 128 MiB instead of 30 % of the machine's memory: the ServerApp's process maps that
#: shared-memory arena, and every page a reply ever passed through stays in its
#: resident set (718 MB on the default run, whose replies are 360 MB each). Larger
#: objects go through Ray's fallback allocation, a file mapped while the reply is read
#: and released after it (peak RSS 3,839 -> 3,240 MB on 2 rounds of the default run,
#: the same round time within 5 %). 384 MiB, room for the two float16 replies in flight
#: of the float16 default run, cut the wait for them by about 4 s a round but raised the
#: peak by 60-220 MB and left the runs no shorter (docs/benchmarks.md).
#: ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` keeps Ray's current handling of accelerator
#: variables (no FutureWarning).
RAY_ENV = {
    "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(128 * 1024 * 1024),
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def superlink_env(flwr_home: Path, env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the private SuperLink: :data:`RAY_ENV` under this one, then ours."""
    # The SuperLink starts flower-superexec / flwr-simulation by name: make this
    # environment's executables the ones found, activated venv or not.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        **RAY_ENV,
        **os.environ,
        "PATH": path,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        **(env_extra or {}),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"flower-superlink not healthy on port {port} after {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the SuperLink and everything it started (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers (simulation, Ray workers)
    except ProcessLookupError:
        pass


def run(
    app_dir: Path,
    run_config: str,
    num_supernodes: int,
    flwr_home: Path,
    workdir: Path,
    client_cpus: float = 1,
    timeout: float = 3600.0,
    env_extra: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Run the app; return ``(status, streamed log)``."""
    port = _free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local-simulation"\n\n'
        f'[superlink.local-simulation]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = superlink_env(flwr_home, env_extra)
    superlink = _start_superlink(port, flwr_home, workdir, env)
    try:
        _wait_healthy(port, superlink)
        cpus = int(client_cpus) if float(client_cpus).is_integer() else client_cpus
        cmd = [
            "flwr",
            "run",
            str(app_dir),
            "local-simulation",
            "--stream",
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus} "
            "client-resources-num-gpus=0.0",
        ]
        if run_config:
            cmd += ["--run-config", run_config]
        log, code = _stream(cmd, env, workdir, timeout)
        match = re.search(r"run (\d+)", log)
        if code != 0 or not match:
            return f"flwr run failed (exit {code})", log
        return _run_status(match.group(1), env, workdir), log
    finally:
        _stop(superlink)


def _start_superlink(
    port: int, flwr_home: Path, workdir: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start a private simulation SuperLink on ``127.0.0.1:port`` in its own process group."""
    with open(flwr_home / "superlink.out", "wb") as out:
        return subprocess.Popen(
            [
                "flower-superlink",
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
                "--log-file",
                str(flwr_home / "superlink.log"),
            ],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _run_status(run_id: str, env: dict[str, str], workdir: Path) -> str:
    """The run's final status as ``flwr ls`` reports it."""
    ls = subprocess.run(
        ["flwr", "ls", "local-simulation", "--run-id", run_id, "--format", "json"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return str(json.loads(ls.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown ({ls.stdout.strip()} {ls.stderr.strip()})"


def _stream(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[str, int]:
    """Run ``cmd``, echoing its output line by line as it comes; ``(output, exit code)``.

    Killed after ``timeout`` seconds, whether or not it is still printing.
    """
    lines: list[str] = []
    killed = threading.Event()
    with subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
        finally:
            timer.cancel()
        code = proc.wait()
    if killed.is_set():
        lines.append(f"flwr run killed after {timeout:.0f} s\n")
    return "".join(lines), code


def write_app(app_dir: Path, cfg: RunConfig, api: str = "message") -> Path:
    """Write a Flower app directory running ``cfg`` (every key fixed) with ``api``'s apps.

    Its ``pyproject.toml`` names the installed package's components
    (:data:`COMPONENTS`) and holds the resolved config as the app's run config,
    so the run needs no ``--run-config`` and works from an installed wheel as
    from this repository.
    """
    serverapp, clientapp = COMPONENTS[api]
    config: dict[str, Any] = {"preset": "", **cfg.to_dict()}
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "flwr-gkt-run",
            "version": __version__,
            "description": "One flwr-gkt run, its config resolved by the Python entry",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "flwr-gkt",
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": config,
                }
            }
        },
    }
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app_dir


def run_config_app(cfg: RunConfig, api: str, num_supernodes: int) -> int:
    """Run ``cfg`` with ``flwr run`` on a private local SuperLink (the Python entry's default).

    The ServerApp runs in this directory (a relative ``results-dir`` is relative
    to it); the Flower home, the app directory and the SuperLink are removed or
    stopped afterwards. Returns 0 when the run finished as ``finished:completed``.
    """
    with tempfile.TemporaryDirectory(prefix="flwr-gkt-") as tmp:
        app_dir = write_app(Path(tmp) / "app", cfg, api)
        status, _ = run(
            app_dir,
            "",
            num_supernodes,
            Path(tmp) / "flwr-home",
            Path.cwd(),
            cfg.client_cpus,
            env_extra={
                TRUST_ENV: "1",
                # The SuperLink's processes import the flwr_gkt this entry runs, not
                # whichever one the environment has installed (another checkout).
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p
                ),
            },
        )
    print(f"flwr run status: {status}", flush=True)
    return 0 if status == "finished:completed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flwr_gkt.app.flwr_local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--app", default=str(APP_DIR), help="Flower app directory")
    parser.add_argument(
        "--run-config", default="", help="e.g. \"preset='smoke' num-server-rounds=2\""
    )
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument("--client-cpus", type=float, default=1)
    parser.add_argument("--flwr-home", default="", help="Flower home (default: a temporary one)")
    parser.add_argument("--workdir", default=".", help="working directory of the ServerApp")
    args = parser.parse_args(argv)
    home = Path(args.flwr_home) if args.flwr_home else Path(tempfile.mkdtemp(prefix="flwr-home-"))
    try:
        status, _ = run(
            Path(args.app),
            args.run_config,
            args.num_supernodes,
            home,
            Path(args.workdir).resolve(),
            args.client_cpus,
        )
    finally:
        if not args.flwr_home:
            shutil.rmtree(home, ignore_errors=True)
    print(f"flwr run status: {status}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
