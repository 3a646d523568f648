"""The commands that change a repository: ``init``, and those that run a flow.

``backup``, ``restore``, ``replicate``, ``verify``, ``prune`` and ``repair``
each run their Prefect flow (``startup.run_flow``), so every such run is in
Prefect's history; usage errors (a retention policy with no rule, a bad
``--read-data``, ``--dask`` without an API) are raised before Prefect is
imported. ``init`` and ``unlock`` call ``keepflow.tasks.core`` directly;
``unlock`` imports Prefect only when this host has a dead flow run of the
repository to mark Crashed. ``serve`` checks its TOML file before Prefect is
imported, then serves its deployments from this process.
"""

from __future__ import annotations

from keepflow.flows.cli import output, reports
from keepflow.flows.cli.startup import cluster, importing, on_cluster, prepare_prefect, run_flow, unlock_ahead
from keepflow.tasks.core.errors import UsageError


def cmd_init(args) -> int:
    from keepflow.tasks.core.repository import RepoConfig, Repository

    if args.format == 1:
        if args.encryption != "aes-256-gcm" or args.compression != "auto":
            raise UsageError("--encryption and --compression are format 2 settings; format 1 is plaintext and "
                             "uncompressed")
        config = RepoConfig()
    else:
        config = RepoConfig.new_v2(encryption=args.encryption, compression=args.compression)
    repo = Repository.init(args.repo, args.storage_options, config=config)
    if args.json:
        output.print_json({"repository": args.repo, "id": repo.config.id, "version": repo.config.version,
                           "encryption": repo.config.encryption, "compression": repo.config.compression})
    else:
        output.print_init(repo, args.repo)
    return 0


def _finish(summary: dict, args, printer, *extra) -> int:
    """Print ``summary`` (as JSON, or with ``printer``) and return its exit code."""
    if args.json:
        output.print_json(summary)
    else:
        printer(summary, *extra)
    return summary["exit_code"]


def cmd_backup(args) -> int:
    on = cluster(args, uses_work_dir=True)
    unlock_ahead(args)
    prepare_prefect(args.verbose, start_server=True)
    with importing():
        from keepflow.flows.backup import backup

    summary = run_flow(on_cluster(backup, on),
                       dict(source=args.source, repo=args.repo, tags=args.tag, excludes=args.exclude,
                            rehash=args.rehash, parent=args.parent, dry_run=args.dry_run,
                            storage_options=args.storage_options,
                            replicate_to=args.replicate_to, wait_for_lease=args.retry_lock, xattrs=args.xattrs,
                            compression=args.compression, **on),
                       args, "backup")
    return _finish(summary, args, reports.print_backup)


def cmd_restore(args) -> int:
    on = cluster(args, uses_work_dir=True)
    unlock_ahead(args)
    prepare_prefect(args.verbose, start_server=True)
    with importing():
        from keepflow.flows.restore import restore

    summary = run_flow(on_cluster(restore, on),
                       dict(repo=args.repo, target=args.target, snapshot=args.snapshot, as_of=args.as_of,
                            includes=args.include, overwrite=args.overwrite, dry_run=args.dry_run,
                            storage_options=args.storage_options, fallbacks=args.fallback, sparse=args.sparse,
                            xattrs=args.xattrs, **on),
                       args, "restore")
    return _finish(summary, args, reports.print_restore, args)


def cmd_replicate(args) -> int:
    prepare_prefect(args.verbose, start_server=True)
    with importing():
        from keepflow.flows.replicate import replicate

    summary = run_flow(replicate, dict(repo=args.repo, replicas=args.replicas, dry_run=args.dry_run,
                                       storage_options=args.storage_options), args, "replicate")
    return _finish(summary, args, reports.print_replication)


def cmd_verify(args) -> int:
    from keepflow.tasks.core.verify import parse_percent

    percent = parse_percent(args.read_data)
    on = cluster(args, uses_work_dir=False)
    if not args.ciphertext_only:
        unlock_ahead(args)
    prepare_prefect(args.verbose, start_server=True)
    with importing():
        from keepflow.flows.verify import verify

    summary = run_flow(on_cluster(verify, on),
                       dict(repo=args.repo, read_data=percent, storage_options=args.storage_options,
                            ciphertext_only=args.ciphertext_only, **on),
                       args, "verify")
    return _finish(summary, args, reports.print_verify)


def cmd_prune(args) -> int:
    from keepflow.tasks.core import retention

    policy = retention.Policy(args.keep_last, args.keep_hourly, args.keep_daily, args.keep_weekly,
                              args.keep_monthly, args.keep_yearly, args.keep_tag)
    if policy.empty():   # refuse before starting a flow run
        raise UsageError("no retention rule given; pass at least one --keep-* option (nothing was forgotten)")
    if args.grace < 0:
        raise UsageError(f"--grace must be 0 or more hours, not {args.grace:g}")
    unlock_ahead(args)
    prepare_prefect(args.verbose, start_server=True)
    with importing():
        from keepflow.flows.prune import prune

    summary = run_flow(prune, dict(repo=args.repo, keep_last=args.keep_last, keep_hourly=args.keep_hourly,
                                   keep_daily=args.keep_daily, keep_weekly=args.keep_weekly,
                                   keep_monthly=args.keep_monthly, keep_yearly=args.keep_yearly,
                                   keep_tags=args.keep_tag, grace_hours=args.grace, dry_run=args.dry_run,
                                   storage_options=args.storage_options, replicas=args.replica), args, "prune")
    return _finish(summary, args, reports.print_prune, args)


def cmd_unlock(args) -> int:
    from keepflow.tasks.core import lease, runs
    from keepflow.tasks.core.repository import Repository

    removed, kept = lease.unlock(Repository.open(args.repo, args.storage_options))
    crashed, elsewhere = [], []
    # Prefect is imported only when this host has a dead run of REPO to mark
    # (tasks/core/runs.py), so a plain unlock stays a sub-second command.
    if runs.dead_runs(runs.default_folder(), args.repo):
        prepare_prefect(args.verbose)
        from keepflow.flows._runs import crash_dead_runs

        crashed, elsewhere = crash_dead_runs(args.repo, by="keepflow unlock")
    if args.json:
        output.print_json({"removed": [x.__dict__ for x in removed], "live": [x.__dict__ for x in kept],
                           "crashed": [{"flow_run_id": r.flow_run_id, "name": r.flow_run_name, "flow": r.flow,
                                        "pid": r.pid} for r in crashed]})
    else:
        reports.print_unlock(removed, kept, crashed, elsewhere)
    return 0


def cmd_repair(args) -> int:
    unlock_ahead(args)
    prepare_prefect(args.verbose, start_server=True)
    with importing():
        from keepflow.flows.repair import repair

    summary = run_flow(repair, dict(repo=args.repo, what=args.what, read_data=getattr(args, "read_data", False),
                                    forget=getattr(args, "forget", False), dry_run=args.dry_run,
                                    storage_options=args.storage_options), args, "repair")
    printer = reports.print_repair_index if args.what == "index" else reports.print_repair_snapshots
    return _finish(summary, args, printer, args)


def cmd_serve(args) -> int:
    from keepflow.flows.serve_config import load

    jobs = load(args.config)  # a bad file fails here, in one line, before Prefect is imported
    for job in jobs:
        when = [job.schedule.describe()] if job.schedule else []
        when += [f"after each backup of {job.after_backup_of}"] if job.after_backup_of else []
        print(f"{job.flow}/{job.name}: {' and '.join(when)}")
    if args.check:
        return 0
    prepare_prefect(args.verbose)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UsageError("keepflow serve needs a running Prefect server for its schedules: start one with "
                         "`prefect server start --host 127.0.0.1` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from keepflow.flows.serve import serve_config

    print(f"serving {len(jobs)} deployments from {args.config} (Prefect API {PREFECT_API_URL.value()}); "
          "Ctrl-C stops", flush=True)
    serve_config(args.config, limit=args.limit)
    return 0
