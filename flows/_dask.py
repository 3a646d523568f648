"""Running a flow's batches on a Dask cluster, through prefect-dask's DaskTaskRunner.

Only batch task runs are submitted to a task runner (``store-b<N>``,
``restore-b<N>``, ``check-data-<N>``); planning, committing and finishing run
in the flow process. So a cluster changes where batches run and nothing else.
Two ways to get one:

* ``--dask ADDRESS`` (``dask_address``, else ``$KEEPFLOW_DASK_ADDRESS``): an
  existing scheduler, ``DaskTaskRunner(address=...)``;
* ``--workers N`` (``workers``): a local process cluster for this run only,
  ``distributed.LocalCluster`` with N single-threaded worker processes on
  127.0.0.1 and no dashboard, stopped when the flow ends. Hashing small files
  is Python work under the GIL (flows/backup.py: more threads made it slower),
  so on one machine processes, not threads, put every core to work.

The command line passes the runner with ``flow.with_options(task_runner=...)``;
a deployment sets the flow parameters, and the flow then enters a runner of
its own for the batch phase (``batches``). Either way the same checks apply:

* the workers need the Prefect API. With ``--dask`` and no ``PREFECT_API_URL``
  the run is refused: those workers were started elsewhere and would each
  start a temporary server of their own (PREFECT_NOTES: 10-15 s apiece, their
  task runs recorded in databases nobody reads). With ``--workers`` we spawn
  the workers ourselves, so they are given the API this process uses: a real
  server, or else the temporary server Prefect starts for this command anyway
  (started a moment earlier, so its address is known before the cluster is);
  the history lands in the usual database;
* the run folder must be reachable by every worker: with ``--dask``, the
  default local temporary work dir is refused when the scheduler is on
  another host (a local scheduler may have local workers; an explicit local
  ``--work-dir`` is taken to be a mount every worker shares);
* at the end of a run every worker drops the run's known-blob set
  (``index.forget_run``), on success and failure alike;
* an encrypted repository needs the password in every worker (each unlocks
  it once, tasks/core/keyring.py). Workers inherit this process's
  environment (``KEEPFLOW_PASSWORD``...), but not a password set in it: the
  CLI's ``--password-file``, a flow's ``password="secret/NAME"``, an answer
  at the prompt or a ``KEEPFLOW_PASSWORD_COMMAND`` already run. The workers
  of a ``--workers`` cluster, started by us, get that one with a worker
  plugin before the first batch (over the loopback connection to a scheduler
  in this process; workers the nanny restarts get it too). A ``--dask``
  cluster's workers never do: the password is not sent over the network, so
  they need it in their own environment (README, "Scaling out").
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from urllib.parse import urlsplit

from keepflow.tasks.core.errors import UsageError

DASK_ENV = "KEEPFLOW_DASK_ADDRESS"
PRELOAD = ("keepflow.tasks.backup", "keepflow.tasks.restore", "keepflow.tasks.verify")


def choose(dask_address: str | None, workers: int | None) -> tuple[str | None, int | None]:
    """The cluster a run asks for: (scheduler address, local worker count); (None, None) for none."""
    if dask_address and workers is not None:
        raise UsageError("--dask and --workers exclude each other: use an existing cluster (--dask ADDRESS) "
                         "or start a local one (--workers N)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError(f"--workers must be a whole number of at least 1, not {workers!r}")
    if not dask_address and workers is None:
        dask_address = os.environ.get(DASK_ENV) or None
    return dask_address, workers


def is_remote(address: str) -> bool:
    """Is the scheduler at ``address`` on another host (not loopback, not one of this host's names)?"""
    text = address if "://" in address else f"tcp://{address}"
    host = (urlsplit(text).hostname or "").lower()
    if host in ("", "localhost", socket.gethostname().lower()):
        return False
    try:
        if ipaddress.ip_address(host).is_loopback:
            return False
    except ValueError:
        pass
    try:
        own = set(socket.gethostbyname_ex(socket.gethostname())[2])
        theirs = set(socket.gethostbyname_ex(host)[2])
    except OSError:
        return True
    return not theirs <= (own | {"127.0.0.1"})


def check(dask_address: str | None, workers: int | None, *, work_dir: str | None = None,
          uses_work_dir: bool = False, api_url: str | None = None) -> None:
    """Refuse a cluster set-up that cannot work, in one line, before anything runs."""
    from keepflow.tasks.core import scratch

    if not dask_address:
        return
    if not api_url:
        raise UsageError(f"--dask needs a Prefect server that the workers at {dask_address} use too: start one "
                         "(`prefect server start --host 0.0.0.0`) and set PREFECT_API_URL here and on every worker")
    if uses_work_dir and scratch.is_default_work_dir(work_dir) and is_remote(dask_address):
        raise UsageError(f"the cluster at {dask_address} runs on another host and cannot read this machine's "
                         "temporary folder: give --work-dir URL (or KEEPFLOW_WORK_DIR) on storage every worker "
                         "reaches, e.g. s3://bucket/keepflow-work or a shared mount")


def api_url() -> str | None:
    """PREFECT_API_URL as set (environment or profile); None means the embedded temporary server."""
    from prefect.settings import PREFECT_API_URL

    from keepflow.flows._history import uses_temporary_server

    if uses_temporary_server():      # no server set up, or the CLI's own temporary one
        return None
    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def _temporary_api_url() -> str:
    """The API of the temporary server Prefect runs for this process (started now if need be).

    ``get_client`` uses this same instance (one per process, no port given),
    so this starts nothing extra: only earlier, so local workers can be told
    where it is before they are spawned.
    """
    from keepflow.flows import _temporary_server

    if _temporary_server.started():        # the CLI started it before importing Prefect
        _temporary_server.wait_ready()
        return os.environ[_temporary_server.ENV]
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def task_runner(dask_address: str | None, workers: int | None):
    """A DaskTaskRunner for the cluster asked for, or None for the flow's own thread pool."""
    if not dask_address and workers is None:
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise UsageError("--dask and --workers need prefect-dask and distributed: "
                         "pip install 'keepflow[dask]' (here and on every worker)") from None

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    # Note: prefect-dask uses the process's default distributed client, if
    # one exists, instead of starting this cluster (never the case in the CLI).
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=dict(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        # No dashboard, but the scheduler still serves HTTP (health, metrics), by
        # default on the fixed port 8787 with a warning on stderr when that is
        # taken: any free loopback port instead.
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        # Workers we spawn talk to the API this process uses (see the module docstring).
        env={"PREFECT_API_URL": api_url() or _temporary_api_url()},
        # Each worker imports Prefect and keepflow as it starts (~3.4 s measured,
        # once per run for a local cluster), while the flow is still planning.
        preload=list(PRELOAD)))


class Batches:
    """Submits a flow's batch tasks to its task runner and cleans up after them on every worker.

    With a Dask runner, connecting (and, for ``--workers``, starting the local
    cluster and its workers' imports, ~4 s here) begins at once in a thread, so
    it overlaps the plan instead of following it. Measured on 50,000 small
    files: the first batch started 3.5 s after the plan ended without this,
    3.1 s with it, on this 2-core machine while other jobs kept both cores
    busy; the overlap pays where a core is idle during the scan.
    """

    def __init__(self, runner=None, dask=None, local=None):
        self._runner = runner      # a runner the flow entered itself (deployments), else None
        self._dask = dask          # the DaskTaskRunner in use, if any
        self._local = local        # this machine's batch processes (batch_processes.Session), if used
        self.submitted = 0
        self._warm_error: BaseException | None = None
        self._warming: threading.Thread | None = None
        if dask is not None:
            self._warming = threading.Thread(target=self._warm, name="keepflow-dask-connect", daemon=True)
            self._warming.start()

    def _warm(self) -> None:
        try:
            _ = self._dask.client      # the property connects (and starts a local cluster)
        except BaseException as exc:   # raised where the batches are submitted
            self._warm_error = exc

    def wait_ready(self) -> None:
        """Let the connecting thread finish; the runner must never be used (or closed) while it runs."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None

    def submit(self, task, **parameters):
        self.wait_ready()
        if self._warm_error is not None:
            raise self._warm_error
        if not self.submitted and self._dask is not None:
            _share_password(self._dask.client)    # the plan has opened the repository: it is known by now
        self.submitted += 1
        if self._runner is None:
            return task.submit(**parameters)
        return self._runner.submit(task, parameters=parameters)

    def done(self) -> None:
        """Every batch has ended: this machine's batch processes can go (see batch_processes.Session.end)."""
        if self._local is not None:
            self._local.end()

    @staticmethod
    def settle(futures) -> None:
        """Wait until every submitted batch has ended (success or not); nothing is raised."""
        for future in futures:
            try:
                future.wait()
            except Exception:
                pass

    def forget_run(self, repo_url: str, run_id: str) -> None:
        """Drop the run's known-blob set in this process and, on a cluster, in every worker."""
        from keepflow.tasks.core import index

        index.forget_run(repo_url, run_id)
        if self._dask is None or not self.submitted:
            return                  # no worker has seen this run
        try:
            self._dask.client.run(index.forget_run, repo_url, run_id, on_error="ignore")
        except Exception:           # a worker that is gone took its cache with it
            pass


PASSWORD_PLUGIN = "keepflow-password"


def _share_password(client) -> None:
    """Hand the password set in this process to the workers of a local cluster we started (module docstring)."""
    import distributed

    from keepflow.tasks.core import passwords

    password = passwords.password_in_process()
    if password is None or not isinstance(client.cluster, distributed.LocalCluster):
        return                      # workers find it in the environment they inherited, or in their own
    client.register_plugin(_password_plugin(password), name=PASSWORD_PLUGIN)


def _password_plugin(password: str):
    from distributed import WorkerPlugin

    class KeepflowPassword(WorkerPlugin):
        """Sets the run's password in a worker (passwords.use_password); its repr never shows it."""

        def __init__(self, value: str):
            self._value = value

        def setup(self, worker) -> None:
            from keepflow.tasks.core import passwords

            passwords.use_password(self._value)

        def __repr__(self) -> str:
            return "KeepflowPassword()"

    return KeepflowPassword(password)


@contextlib.contextmanager
def batches(dask_address: str | None, workers: int | None, *, work_dir: str | None = None,
            uses_work_dir: bool = False):
    """Where the flow's batches run: the flow's task runner, or a cluster the parameters ask for."""
    from prefect.context import FlowRunContext

    dask_address, workers = choose(dask_address, workers)
    ctx = FlowRunContext.get()
    current = ctx.task_runner if ctx else None
    if _is_dask(current):                          # the command line passed it (with_options)
        batches = Batches(dask=current)
        try:
            yield batches
        finally:
            batches.wait_ready()                   # before the engine closes the runner
        return
    if not dask_address and workers is None:
        from keepflow.tasks.core import batch_processes

        with batch_processes.session() as local:     # this machine's cores, for runs of several batches
            yield Batches(local=local)
        return
    check(dask_address, workers, work_dir=work_dir, uses_work_dir=uses_work_dir, api_url=api_url())
    with task_runner(dask_address, workers) as runner:
        batches = Batches(runner=runner, dask=runner)
        try:
            yield batches
        finally:
            batches.wait_ready()


def _is_dask(runner) -> bool:
    return type(runner).__name__ == "DaskTaskRunner"    # no prefect_dask import for the thread pool
