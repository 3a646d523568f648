"""``make demo``: a real backup, a change, an incremental backup, a restore, a check, a verify.

The repository is format 2, encrypted: the demo sets its own password (in
``KEEPFLOW_PASSWORD`` for this process only, unless one is set already) and
says so.

Runs on Prefect's embedded default (no server to start). Everything happens
under ./demo-work, which is recreated on each run. Each step runs through the
real ``keepflow`` command line in this process, so the output is exactly what
a user sees.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time

from keepflow.tasks.core import treeinfo

WORK = os.path.abspath("demo-work")
DEMO_PASSWORD = "keepflow demo password"


def make_sample_tree(root: str, seed: int = 7) -> None:
    rng = random.Random(seed)
    for d in range(8):
        folder = os.path.join(root, f"project-{d}", "src" if d % 2 else "docs")
        os.makedirs(folder, exist_ok=True)
        for f in range(25):
            size = rng.choice([0, 100, 2_000, 30_000, 200_000])
            with open(os.path.join(folder, f"file-{f}.dat"), "wb") as fh:
                fh.write(rng.randbytes(size))
    with open(os.path.join(root, "big-video.bin"), "wb") as fh:   # cut into content-defined chunks
        fh.write(random.Random(seed + 1).randbytes(3 * 1024 * 1024))
    with open(os.path.join(root, "server.log"), "w") as fh:         # text: stored compressed
        fh.writelines(f"2026-12-01 12:{i // 60 % 60:02d}:{i % 60:02d} INFO request {i} served in {i % 97} ms\n"
                      for i in range(40000))
    with open(os.path.join(root, "notes with spaces – ünïcode.txt"), "w") as fh:
        fh.write("keepflow keeps names as they are\n")
    os.makedirs(os.path.join(root, "empty-folder"))
    os.symlink("project-0/docs/file-0.dat", os.path.join(root, "link-to-first"))
    os.chmod(os.path.join(root, "project-1", "src", "file-1.dat"), 0o600)
    with open(os.path.join(root, ".keepflowignore"), "w") as fh:
        fh.write("*.tmp\n")
    with open(os.path.join(root, "scratch.tmp"), "w") as fh:
        fh.write("ignored by .keepflowignore\n")


def change_tree(root: str) -> None:
    with open(os.path.join(root, "project-0", "docs", "file-3.dat"), "ab") as fh:
        fh.write(b"appended")
    with open(os.path.join(root, "project-2", "docs", "new-file.txt"), "w") as fh:
        fh.write("added after the first snapshot\n")
    os.remove(os.path.join(root, "project-3", "src", "file-4.dat"))


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def keepflow(*args: str) -> int:
    from keepflow.flows.cli import main

    print("$ keepflow " + " ".join(f"'{a}'" if " " in a else a for a in args), flush=True)
    code = main(list(args))
    if code not in (0,):
        print(f"keepflow exited with {code}", file=sys.stderr)
        raise SystemExit(code)
    return code


def main() -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.path.exists(WORK):
        shutil.rmtree(WORK)
    source, repo = os.path.join(WORK, "source"), os.path.join(WORK, "repo")
    started = time.time()
    if not any(os.environ.get(v) for v in ("KEEPFLOW_PASSWORD", "KEEPFLOW_PASSWORD_FILE", "KEEPFLOW_PASSWORD_COMMAND")):
        os.environ["KEEPFLOW_PASSWORD"] = DEMO_PASSWORD
        print(f"The demo repository is encrypted. Its password, set by the demo for this run only, is "
              f"{DEMO_PASSWORD!r}\n(run `KEEPFLOW_PASSWORD='{DEMO_PASSWORD}' keepflow snapshots {repo}` "
              "to look at it afterwards).")

    step("1. a sample tree")
    make_sample_tree(source)
    before = treeinfo.describe(source)
    before = {p: v for p, v in before.items() if not p.endswith(".tmp")}
    print(f"{sum(1 for v in before.values() if v[0] == 'file')} files in {source}")
    # Let the racy-timestamp window pass so the incremental run can trust mtimes.
    time.sleep(2.1)

    step("2. create an encrypted repository, then the first backup")
    keepflow("init", repo)
    keepflow("backup", source, repo, "--tag", "demo")

    step("3. change a few files, then an incremental backup")
    change_tree(source)
    keepflow("backup", source, repo, "--tag", "demo")

    step("4. the snapshots")
    keepflow("snapshots", repo)
    from keepflow.tasks.core.repository import Repository
    from keepflow.tasks.core.snapshots import list_snapshots
    first, second = list_snapshots(Repository.open(repo))[:2]
    keepflow("diff", repo, first.short_id, second.short_id)

    step("5. restore the first snapshot into a new folder")
    target = os.path.join(WORK, "restored-first")
    keepflow("restore", repo, target, "--snapshot", first.short_id)

    step("6. check the restore")
    after = treeinfo.describe(target)
    problems = treeinfo.differences(before, after)
    if problems:
        print("restore differs from the original tree:\n  " + "\n  ".join(problems))
        return 1
    print(f"restored tree is identical to the first snapshot's source "
          f"({len(after)} entries: content, modes, mtimes, symlinks, empty folders)")

    step("7. verify the repository, decrypting and re-hashing all of its data")
    keepflow("verify", repo, "--read-data", "100%")

    step("8. what a storage provider can check without the password")
    password = os.environ.pop("KEEPFLOW_PASSWORD", None)
    try:
        keepflow("verify", repo, "--ciphertext-only")
    finally:
        if password is not None:
            os.environ["KEEPFLOW_PASSWORD"] = password
    print(f"\ndemo finished in {time.time() - started:.1f} s; see the runs with "
          f"`{sys.prefix}/bin/prefect flow-run ls`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
