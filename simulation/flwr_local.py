"""Run the app with ``flwr run`` on a private local simulation SuperLink.

``python -m simulation.flwr_local [--num-supernodes N] [--run-config "k=v ..."]``

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
import time
import urllib.request
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
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


def _stop(proc: subprocess.Popen) -> None:
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
    client_cpus: int = 1,
    timeout: float = 3600.0,
) -> tuple[str, str]:
    """Run the app; return ``(status, streamed log)``."""
    port = _free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local-simulation"\n\n'
        f'[superlink.local-simulation]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # The SuperLink starts flower-superexec / flwr-simulation by name: make this
    # environment's executables the ones found, activated venv or not.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {
        **os.environ,
        "PATH": path,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    with open(flwr_home / "superlink.out", "wb") as out:
        superlink = subprocess.Popen(
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
    try:
        _wait_healthy(port, superlink)
        cmd = [
            "flwr",
            "run",
            str(app_dir),
            "local-simulation",
            "--stream",
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus} "
            "client-resources-num-gpus=0.0",
        ]
        if run_config:
            cmd += ["--run-config", run_config]
        proc = subprocess.run(
            cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout
        )
        log = proc.stdout + proc.stderr
        sys.stdout.write(log)
        match = re.search(r"run (\d+)", log)
        if proc.returncode != 0 or not match:
            return f"flwr run failed (exit {proc.returncode})", log
        ls = subprocess.run(
            ["flwr", "ls", "local-simulation", "--run-id", match.group(1), "--format", "json"],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            status = json.loads(ls.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            status = f"unknown ({ls.stdout.strip()} {ls.stderr.strip()})"
        return status, log
    finally:
        _stop(superlink)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.flwr_local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--app", default=str(APP_DIR), help="Flower app directory")
    parser.add_argument(
        "--run-config", default="", help="e.g. \"preset='smoke' num-server-rounds=2\""
    )
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument("--client-cpus", type=int, default=1)
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
