#!/usr/bin/env python3
"""Launch r1jax on Cloud TPU: TPU VMs, queued resources, multi-slice, all-worker runs.

One script, one subcommand per step (see launch/README.md for the walk-through):

    python launch/tpu.py create  --name N --zone Z --accelerator v5p-8 [--spot]     # TPU VM / slice now
    python launch/tpu.py queue   --name N --zone Z --accelerator v5p-512 --spot     # queued resource
    python launch/tpu.py queue   --name N --zone Z --accelerator v6e-256 --node-count 2   # 2 slices
    python launch/tpu.py wait    --name N --zone Z                                  # until ACTIVE
    python launch/tpu.py setup   --name N --zone Z [--repo-url URL]                 # install on all workers
    python launch/tpu.py run     --name N --zone Z --config configs/r1.py --workdir gs://B/run1 [-- --config.x=y]
    python launch/tpu.py logs    --name N --zone Z [--worker 0]                     # tail a worker's log
    python launch/tpu.py stop    --name N --zone Z                                  # SIGTERM -> checkpoint
    python launch/tpu.py delete  --name N --zone Z [--queued]                       # tear down

Every subcommand takes --dry-run, which prints the exact gcloud commands (one per line, shell-quoted,
copy-pastable) instead of running them. --zone and --project default to $R1JAX_ZONE / $R1JAX_PROJECT.

Naming convention: a queued resource NAME creates the TPU node NAME (one slice) or the nodes
NAME-0 .. NAME-{K-1} (--node-count K, multi-slice), so every later subcommand only needs --name.
Only the standard library is used, so this runs anywhere gcloud does.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)

GCLOUD = "gcloud"
TPU_VM = [GCLOUD, "compute", "tpus", "tpu-vm"]
QR = [GCLOUD, "compute", "tpus", "queued-resources"]
QR_ALPHA = [GCLOUD, "alpha", "compute", "tpus", "queued-resources"]  # --best-effort is alpha-only

DEFAULT_REMOTE_DIR = "r1jax"  # relative paths on workers are relative to $HOME
DEFAULT_LOG = "r1jax-logs/r1jax.log"  # outside the repo dir, which `setup` replaces
REMOTE_TARBALL = "r1jax-src.tar.gz"

# States after which a queued resource will never become ACTIVE by waiting.
QR_DEAD_STATES = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")


class LaunchError(Exception):
    """A user-facing error: printed as `error: ...`, exit code 2."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Accelerator types
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Gen:
    type_prefix: str  # prefix of the gcloud accelerator type
    runtime: str  # default TPU software version (--version / --runtime-version)
    cores_per_chip: int  # the N in v4-N / v5p-N counts TensorCores (2 per chip); v5e/v6e count chips
    single_host_chips: int  # the largest slice served by one TPU VM host
    sizes: Callable[[int], bool]  # valid N


_GENERATIONS = {
    "v4": _Gen("v4", "tpu-ubuntu2204-base", 2, 4, lambda n: n % 8 == 0 and 8 <= n <= 8192),
    "v5p": _Gen("v5p", "v2-alpha-tpuv5", 2, 4, lambda n: n % 8 == 0 and 8 <= n <= 17920),
    "v5e": _Gen("v5litepod", "v2-alpha-tpuv5-lite", 1, 8, lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": _Gen("v6e", "v2-alpha-tpuv6e", 1, 8, lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v6e": "v6e"}
_ACCEL_HELP = ("v4-N or v5p-N (N = TensorCores, 2 per chip: v5p-512 = 256 chips), v5litepod-N / v5e-N or "
               "v6e-N (N = chips), or a topology such as v5p:4x8x8 or v6e:16x16")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    generation: str  # v4 | v5p | v5e | v6e
    gcloud_type: str  # what gcloud's --accelerator-type wants, e.g. v5litepod-16
    chips: int
    hosts: int  # TPU VM workers per slice
    runtime: str  # default software version

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def parse_accelerator(spec: str) -> Accelerator:
    """`v5p-512`, `v5e-16`, `v5litepod-16`, `v6e-256`, `v4-8` or `v5p:4x8x8` -> Accelerator."""
    s = spec.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", s)
    t = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", s)
    if m and m.group(1) in _ALIASES:
        gen_name, count = _ALIASES[m.group(1)], int(m.group(2))
        gen = _GENERATIONS[gen_name]
    elif t and t.group(1) in _ALIASES:
        gen_name = _ALIASES[t.group(1)]
        gen = _GENERATIONS[gen_name]
        chips = 1
        for d in t.group(2).split("x"):
            chips *= int(d)
        count = chips * gen.cores_per_chip
    else:
        raise LaunchError(f"unknown accelerator type {spec!r}: expected {_ACCEL_HELP}")
    if not gen.sizes(count):
        unit = "TensorCores, a multiple of 8" if gen.cores_per_chip == 2 else "chips: 1, 4, 8, 16, ..., 256"
        raise LaunchError(f"unknown accelerator type {spec!r}: {gen.type_prefix}-{count} is not a valid "
                          f"{gen_name} slice (N counts {unit})")
    chips = count // gen.cores_per_chip
    hosts = 1 if chips <= gen.single_host_chips else chips // 4
    return Accelerator(gen_name, f"{gen.type_prefix}-{count}", chips, hosts, gen.runtime)


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,58}[a-z0-9])?")
_ZONE_RE = re.compile(r"[a-z]+-[a-z]+\d+-[a-z]")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.S)
_GS_RE = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?")


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise LaunchError(f"invalid --name {name!r}: use lowercase letters, digits and hyphens, starting "
                          "with a letter (at most 60 characters)")
    return name


def resolve_zone(args) -> str:
    zone = args.zone or os.environ.get("R1JAX_ZONE", "")
    if not zone:
        raise LaunchError("missing --zone (e.g. --zone us-east5-a for v5p, us-central2-b for v4); "
                          "or export R1JAX_ZONE")
    if not _ZONE_RE.fullmatch(zone):
        hint = " (that looks like a region; add the zone letter, e.g. -a)" if re.fullmatch(
            r"[a-z]+-[a-z]+\d+", zone) else ""
        raise LaunchError(f"invalid --zone {zone!r}{hint}")
    return zone


def location_flags(args) -> list[str]:
    flags = [f"--zone={resolve_zone(args)}"]
    project = args.project or os.environ.get("R1JAX_PROJECT", "")
    if project:
        flags.append(f"--project={project}")
    return flags


def check_node_count(n: int) -> int:
    if n < 1:
        raise LaunchError(f"--node-count must be >= 1, got {n}")
    return n


def check_workdir(workdir: str, accel: Optional[Accelerator], node_count: int, allow_local: bool) -> None:
    if workdir.startswith("gs://"):
        if not _GS_RE.fullmatch(workdir):
            raise LaunchError(f"--workdir {workdir!r} is not a valid gs://BUCKET/PATH")
        return
    if "://" in workdir:
        raise LaunchError(f"--workdir {workdir!r}: only gs:// or local paths are supported")
    multi = node_count > 1 or (accel is not None and accel.multi_host)
    why = ("every worker would write its own local copy: checkpoints and metrics are split across hosts "
           "and lost when the TPU is preempted or deleted. Use a bucket path such as gs://BUCKET/runs/NAME")
    if multi:
        what = f"{node_count} slices" if node_count > 1 else f"{accel.gcloud_type} ({accel.hosts} hosts)"
        raise LaunchError(f"--workdir {workdir!r} is a local path on a multi-host job ({what}): {why}")
    if accel is None and not allow_local:
        raise LaunchError(f"--workdir {workdir!r} is not on gs://: on a multi-host slice {why}. For a "
                          "single-host TPU VM pass --accelerator (e.g. v5p-8) or --allow-local-workdir")
    warn(f"--workdir {workdir!r} is on the TPU VM's local disk: it is lost when the VM is preempted or "
         "deleted; prefer gs://BUCKET/PATH")


def check_remote_path(path: str, flag: str) -> str:
    p = path.rstrip("/")
    if not p or p in (".", "~", "/", "$HOME") or ".." in p.split("/") or "\n" in p:
        raise LaunchError(f"invalid {flag} {path!r}")
    return p


def pid_file(log: str) -> str:
    """The job's pid file, next to its log: r1jax-logs/r1jax.log -> r1jax-logs/r1jax.pid."""
    return os.path.splitext(log)[0] + ".pid"


def job_alive(rpid: str) -> str:
    """Shell test: the pid file names a live r1jax.main process (not a recycled pid, not a zombie)."""
    return f"[ -f {rpid} ] && grep -qs r1jax.main /proc/\"$(cat {rpid})\"/cmdline"


def rpath(path: str) -> str:
    """A path for a remote shell command: relative paths and ~/ are anchored at $HOME."""
    if path.startswith("/"):
        return shlex.quote(path)
    if path.startswith("~/"):
        path = path[2:]
    return '"$HOME"/' + shlex.quote(path)


# ----------------------------------------------------------------------------------------------
# Steps: a gcloud argv (printed by --dry-run, run with subprocess) or a local Python step
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    argv: list[str]  # what --dry-run prints (shell-quoted)
    local: Optional[Callable[[], None]] = None  # run in-process instead of as a subprocess


def ssh_argv(name: str, loc: list[str], command: str, *, node_count: int = 1, worker: str = "all",
             extra: Sequence[str] = ()) -> list[str]:
    """ssh into every worker of a TPU VM / slice, or of every slice of a multi-slice queued resource."""
    if node_count > 1:
        return [*QR, "ssh", name, f"--worker={worker}", "--node=all", *loc, *extra, f"--command={command}"]
    return [*TPU_VM, "ssh", name, f"--worker={worker}", *loc, *extra, f"--command={command}"]


def scp_argv(src: str, name: str, dest: str, loc: list[str], *, node_count: int = 1,
             extra: Sequence[str] = ()) -> list[str]:
    if node_count > 1:
        return [*QR, "scp", src, f"{name}:{dest}", "--worker=all", "--node=all", *loc, *extra]
    return [*TPU_VM, "scp", src, f"{name}:{dest}", "--worker=all", *loc, *extra]


def ssh_extra(args) -> list[str]:
    return [f"--strict-host-key-checking={args.strict_host_key_checking}"] if getattr(
        args, "strict_host_key_checking", None) else []


def execute(steps: list[Step], dry_run: bool) -> int:
    if dry_run:
        for step in steps:
            print(shlex.join(step.argv))
        return 0
    gcloud = shutil.which(GCLOUD)
    if any(s.local is None for s in steps) and gcloud is None:
        raise LaunchError("gcloud not found on PATH: install the Google Cloud SDK "
                          "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`, "
                          "or pass --dry-run to print the commands instead")
    for step in steps:
        print("+ " + shlex.join(step.argv), file=sys.stderr, flush=True)
        if step.local is not None:
            step.local()
            continue
        rc = subprocess.run([gcloud, *step.argv[1:]]).returncode
        if rc != 0:
            raise CommandFailed(rc, step.argv)
    return 0


class CommandFailed(LaunchError):
    def __init__(self, rc: int, argv: list[str]):
        super().__init__(f"command failed (exit code {rc}): {shlex.join(argv)}")
        self.rc = rc


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------

def cmd_create(args) -> int:
    name = check_name(args.name)
    accel = parse_accelerator(args.accelerator)
    if check_node_count(args.node_count) > 1:
        raise LaunchError(f"--node-count {args.node_count}: multi-slice needs queued resources; use "
                          f"`queue --name {name} --accelerator {args.accelerator} --node-count "
                          f"{args.node_count}` instead of `create`")
    argv = [*TPU_VM, "create", name, *location_flags(args), f"--accelerator-type={accel.gcloud_type}",
            f"--version={args.version or accel.runtime}"]
    if args.spot:
        argv.append("--spot")
    if args.reserved:
        argv.append("--reserved")
    argv += args.gcloud_flag
    if accel.multi_host:
        print(f"# {accel.gcloud_type}: {accel.chips} chips on {accel.hosts} hosts", file=sys.stderr)
    return execute([Step(argv)], args.dry_run)


def cmd_queue(args) -> int:
    name = check_name(args.name)
    accel = parse_accelerator(args.accelerator)
    k = check_node_count(args.node_count)
    base = QR_ALPHA if args.best_effort else QR
    argv = [*base, "create", name, *location_flags(args), f"--accelerator-type={accel.gcloud_type}",
            f"--runtime-version={args.version or accel.runtime}"]
    argv += [f"--node-count={k}", f"--node-prefix={name}"] if k > 1 else [f"--node-id={name}"]
    for flag in ("spot", "reserved", "best_effort"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.valid_until_duration:
        argv.append(f"--valid-until-duration={args.valid_until_duration}")
    argv += args.gcloud_flag
    if k > 1:
        print(f"# {k} slices of {accel.gcloud_type} ({k * accel.chips} chips, {k * accel.hosts} hosts): nodes "
              f"{name}-0 .. {name}-{k - 1}; data-parallel over DCN needs --config.mesh.dcn.data={k} in `run`",
              file=sys.stderr)
    return execute([Step(argv)], args.dry_run)


def describe_state_argv(name: str, loc: list[str]) -> list[str]:
    return [*QR, "describe", name, *loc, "--format=value(state.state)"]


def cmd_wait(args) -> int:
    name = check_name(args.name)
    argv = describe_state_argv(name, location_flags(args))
    if args.dry_run:
        print(f"# poll every {args.interval:g}s until the state is ACTIVE "
              f"(fails on {', '.join(QR_DEAD_STATES)})")
        print(shlex.join(argv))
        return 0
    gcloud = shutil.which(GCLOUD)
    if gcloud is None:
        raise LaunchError("gcloud not found on PATH: install the Google Cloud SDK or pass --dry-run")
    start, last = time.monotonic(), None
    while True:
        proc = subprocess.run([gcloud, *argv[1:]], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LaunchError(f"`{shlex.join(argv)}` failed (exit code {proc.returncode}): "
                              f"{proc.stderr.strip()}")
        state = proc.stdout.strip() or "UNKNOWN"
        if state != last:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {state}", flush=True)
            last = state
        if state == "ACTIVE":
            return 0
        if state in QR_DEAD_STATES:
            raise LaunchError(f"queued resource {name} is {state}; it will not become ACTIVE. Inspect it with "
                              f"`gcloud compute tpus queued-resources describe {name}`, then `delete` and "
                              "`queue` again (a preempted spot slice ends SUSPENDED)")
        if args.timeout and time.monotonic() - start > args.timeout:
            raise LaunchError(f"timed out after {args.timeout:g}s waiting for {name} (state {state})")
        time.sleep(args.interval)


def pack_tree(output: str, root: str = REPO_ROOT) -> int:
    """Tar the working tree (tracked + untracked files that git does not ignore; no .git). Returns #files."""
    files: list[str] = []
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        files = sorted({f for f in out.split("\0") if f})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk, skipping the usual junk
        skip_dirs = {".git", "__pycache__", ".pytest_cache", ".venv", "venv", "build", "dist"}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.endswith(".egg-info")
                                 and not d.startswith("workdir"))
            rel = os.path.relpath(dirpath, root)
            files += [os.path.normpath(os.path.join(rel, f)) for f in sorted(filenames) if not f.endswith(".pyc")]
    files = [f for f in files if not f.startswith(".git/") and os.path.lexists(os.path.join(root, f))]
    if not any(f == "setup.py" or f == "pyproject.toml" for f in files):
        raise LaunchError(f"{root} does not look like the r1jax repository (no setup.py)")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with tarfile.open(output, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(root, f), arcname=f, recursive=False)
    size = os.path.getsize(output) / 2**20
    print(f"packed {len(files)} files from {root} -> {output} ({size:.1f} MiB)", file=sys.stderr)
    if size > 200:
        warn("the tarball is large: keep data and run outputs out of the tree (or in .gitignore)")
    return len(files)


def cmd_pack(args) -> int:
    pack_tree(args.output, args.root)
    return 0


def default_tarball(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"r1jax-src-{name}.tar.gz")


def cmd_setup(args) -> int:
    name = check_name(args.name)
    k = check_node_count(args.node_count)
    loc = location_flags(args)
    remote = check_remote_path(args.remote_dir, "--remote-dir")
    rdir, rnew, py = rpath(remote), rpath(remote + ".new"), shlex.quote(args.python)
    install = (f"cd {rdir}; {py} -m pip --version > /dev/null 2>&1 || "
               "{ sudo apt-get update -qq && sudo apt-get install -y -qq python3-pip; }; "
               f"{py} -m pip install --upgrade pip setuptools wheel; "
               f"{py} -m pip install -e {shlex.quote('.[' + args.extras + ']') if args.extras else '.'}; "
               f"{py} -c 'import socket, jax, r1jax; print(socket.gethostname(), \"r1jax ready, jax\", jax.__version__)'")
    steps: list[Step] = []
    if args.repo_url:
        fetch = (f"set -e; if [ ! -d {rdir}/.git ]; then git clone {shlex.quote(args.repo_url)} {rdir}; fi; "
                 f"git -C {rdir} fetch origin {shlex.quote(args.ref)}; git -C {rdir} checkout --force FETCH_HEAD; ")
        steps.append(Step(ssh_argv(name, loc, fetch + install, node_count=k, extra=ssh_extra(args))))
    else:
        tarball = args.tarball or default_tarball(name)
        root = args.root
        steps.append(Step(["python3", SCRIPT, "pack", f"--output={tarball}"]
                          + ([] if os.path.abspath(root) == REPO_ROOT else [f"--root={root}"]),
                          local=lambda: pack_tree(tarball, root)))
        steps.append(Step(scp_argv(tarball, name, REMOTE_TARBALL, loc, node_count=k, extra=ssh_extra(args))))
        unpack = (f"set -e; rm -rf {rnew}; mkdir -p {rnew}; tar -xzf {rpath(REMOTE_TARBALL)} -C {rnew}; "
                  f"rm -rf {rdir}; mv {rnew} {rdir}; ")
        steps.append(Step(ssh_argv(name, loc, unpack + install, node_count=k, extra=ssh_extra(args))))
    return execute(steps, args.dry_run)


def split_passthrough(extras: list[str]) -> list[str]:
    """Unknown args of `run` go to r1jax.main: anything after `--`, or --config.path=value overrides."""
    if "--" in extras:
        i = extras.index("--")
        before, after = extras[:i], extras[i + 1:]
    else:
        before, after = extras, []
    if "--dry-run" in after:
        raise LaunchError("--dry-run after `--` would be passed to r1jax.main; put it before `--`")
    for a in before:
        if not a.startswith("--config."):
            raise LaunchError(f"unrecognized argument {a!r} (to pass flags through to r1jax.main, put them "
                              "after `--`)")
    return before + after


def cmd_run(args, passthrough: list[str]) -> int:
    name = check_name(args.name)
    k = check_node_count(args.node_count)
    loc = location_flags(args)
    accel = parse_accelerator(args.accelerator) if args.accelerator else None
    check_workdir(args.workdir, accel, k, args.allow_local_workdir)
    if k > 1 and not any(a.startswith("--config.mesh.dcn") for a in passthrough):
        warn(f"{k} slices: the slices talk over DCN; set the config's DCN mesh, e.g. "
             f"`-- --config.mesh.dcn.data={k}`, unless the config already does")
    config_file = args.config.split(":", 1)[0]
    if not os.path.exists(os.path.join(REPO_ROOT, config_file)):
        warn(f"--config {config_file} does not exist in {REPO_ROOT}: it must exist in the copy on the workers")
    env: list[str] = []
    if args.compilation_cache:
        env.append(f"JAX_COMPILATION_CACHE_DIR={args.compilation_cache}")
    for e in args.env:
        if not _ENV_RE.fullmatch(e):
            raise LaunchError(f"--env {e!r}: expected KEY=VALUE")
        env.append(e)
    log = check_remote_path(args.log, "--log")
    rlog, rpid = rpath(log), rpath(pid_file(log))
    rlogdir = rpath(os.path.dirname(log)) if os.path.dirname(log) else '"$HOME"'
    main = [args.python, "-m", "r1jax.main", "--config", args.config, "--workdir", args.workdir, *passthrough]
    job = shlex.join(["nohup", *(["env", *env] if env else []), *main])
    remote = (
        f"set -e; mkdir -p {rlogdir}; "
        f"if {job_alive(rpid)}; then "
        f"echo \"r1jax is already running on $(hostname) (pid $(cat {rpid})); use stop first\" >&2; exit 1; fi; "
        f"cd {rpath(check_remote_path(args.remote_dir, '--remote-dir'))}; "
        f"echo \"=== $(date -u +%FT%TZ) $(hostname):\" {shlex.quote(shlex.join(main))} >> {rlog}; "
        f"{job} >> {rlog} 2>&1 < /dev/null & echo $! > {rpid}; "
        f"echo \"started r1jax on $(hostname) (pid $(cat {rpid})), log:\" {shlex.quote(log)}")
    rc = execute([Step(ssh_argv(name, loc, remote, node_count=k, extra=ssh_extra(args)))], args.dry_run)
    if not args.dry_run:
        print(f"running on every worker; follow worker 0 with: python launch/tpu.py logs --name {name} "
              f"{' '.join(loc)}" + (" --node 0" if k > 1 else ""), file=sys.stderr)
    return rc


def node_target(name: str, node: Optional[int]) -> str:
    return name if node is None else f"{name}-{node}"


def cmd_logs(args) -> int:
    name = check_name(args.name)
    worker = str(args.worker)
    if worker != "all" and not worker.isdigit():
        raise LaunchError(f"--worker must be a worker index or `all`, got {worker!r}")
    k = check_node_count(args.node_count)
    node = args.node
    if node is None and k > 1:
        node = 0  # multi-slice: the nodes are NAME-0 .. NAME-{k-1}
    if node is not None and node < 0:
        raise LaunchError(f"--node must be >= 0, got {node}")
    if node is not None and k > 1 and node >= k:
        raise LaunchError(f"--node {node} is out of range for --node-count {k} (nodes {name}-0 .. {name}-{k - 1})")
    follow = args.follow if args.follow is not None else worker != "all"
    log = check_remote_path(args.log, "--log")
    tail = f"tail -n {args.lines}{' -F' if follow else ''} {rpath(log)}"
    argv = ssh_argv(node_target(name, node), location_flags(args), tail, worker=worker, extra=ssh_extra(args))
    return execute([Step(argv)], args.dry_run)


def cmd_stop(args) -> int:
    name = check_name(args.name)
    k = check_node_count(args.node_count)
    rpid = rpath(pid_file(check_remote_path(args.log, "--log")))
    remote = (f"if {job_alive(rpid)} && kill -TERM \"$(cat {rpid})\"; then "
              f"echo \"sent SIGTERM to r1jax (pid $(cat {rpid})) on $(hostname)\"; "
              f"else echo \"r1jax is not running on $(hostname)\"; fi")
    return execute([Step(ssh_argv(name, location_flags(args), remote, node_count=k, extra=ssh_extra(args)))],
                   args.dry_run)


def cmd_status(args) -> int:
    name = check_name(args.name)
    queued = args.queued or args.node_count > 1
    argv = [*(QR if queued else TPU_VM), "describe", name, *location_flags(args)]
    return execute([Step(argv)], args.dry_run)


def cmd_delete(args) -> int:
    name = check_name(args.name)
    queued = args.queued or check_node_count(args.node_count) > 1
    if queued:  # --force deletes the queued resource's TPU nodes first, then the request itself
        argv = [*QR, "delete", name, *location_flags(args), "--force", "--quiet"]
    else:
        argv = [*TPU_VM, "delete", name, *location_flags(args), "--quiet"]
    return execute([Step(argv)], args.dry_run)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0],
                                epilog="See launch/README.md. Every subcommand has --dry-run.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:  # exact flag names: `--zon x` must not mean --zone
        return sub.add_parser(name, allow_abbrev=False, **kw)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True,
                        help="TPU VM / queued resource name (multi-slice nodes are NAME-0, NAME-1, ...)")
    common.add_argument("--zone", help="e.g. us-east5-a (default: $R1JAX_ZONE)")
    common.add_argument("--project", help="GCP project (default: $R1JAX_PROJECT, else gcloud's configured one)")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")

    slices = argparse.ArgumentParser(add_help=False)
    slices.add_argument("--node-count", type=int, default=1,
                        help="number of slices of the queued resource (multi-slice); default 1")

    ssh = argparse.ArgumentParser(add_help=False)
    ssh.add_argument("--strict-host-key-checking", choices=["yes", "no", "ask"],
                     help="passed to gcloud ssh/scp (`no` skips host-key prompts on a fresh slice)")

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR,
                        help=f"repo location on each worker, relative to $HOME (default: {DEFAULT_REMOTE_DIR})")
    remote.add_argument("--python", default="python3", help="python on the workers (default: python3)")

    logf = argparse.ArgumentParser(add_help=False)
    logf.add_argument("--log", default=DEFAULT_LOG,
                      help=f"log file on each worker, relative to $HOME (default: {DEFAULT_LOG}; the pid goes "
                      "next to it, r1jax.pid)")

    def accel_arg(sp, required=True):
        sp.add_argument("--accelerator", required=required, metavar="TYPE",
                        help=_ACCEL_HELP if required else "the slice type, to check the workdir: " + _ACCEL_HELP)
        if required:
            sp.add_argument("--version", help="TPU software version (default per generation: v4 "
                            "tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)")
            sp.add_argument("--gcloud-flag", action="append", default=[], metavar="FLAG",
                            help="extra flag for gcloud, e.g. --gcloud-flag=--network=my-net (repeatable)")

    sp = add("create", parents=[common, slices], help="create a TPU VM or a multi-host slice now",
                        description="Create a TPU VM (single host) or a multi-host slice with "
                                    "`gcloud compute tpus tpu-vm create`. For multi-slice use `queue`.")
    accel_arg(sp)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--spot", action="store_true", help="Spot VMs: cheaper, preemptible")
    g.add_argument("--reserved", action="store_true", help="use the project's reserved capacity")
    sp.set_defaults(func=cmd_create)

    sp = add("queue", parents=[common, slices], help="request a queued resource (spot/reserved, multi-slice)",
                        description="Request TPUs with `gcloud compute tpus queued-resources create`: the request "
                                    "waits in a queue until capacity frees up (then `wait` returns).")
    accel_arg(sp)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible")
    g.add_argument("--reserved", action="store_true", help="use the project's reservation")
    g.add_argument("--best-effort", action="store_true", help="best-effort tier (gcloud alpha)")
    sp.add_argument("--valid-until-duration", metavar="DURATION",
                    help="give up if not provisioned within DURATION, e.g. 6h")
    sp.set_defaults(func=cmd_queue)

    sp = add("wait", parents=[common, slices], help="poll a queued resource until it is ACTIVE")
    sp.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    sp.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (default: never)")
    sp.set_defaults(func=cmd_wait)

    sp = add("setup", parents=[common, slices, ssh, remote], help="install r1jax on every worker",
                        description="Copy the r1jax working tree (default: a tarball of this checkout) or clone "
                                    "--repo-url onto every worker, then pip install -e .[tpu].")
    sp.add_argument("--repo-url", help="git clone this URL on the workers instead of copying this checkout")
    sp.add_argument("--ref", default="HEAD", help="branch, tag or commit to check out with --repo-url (default: HEAD)")
    sp.add_argument("--tarball", help="local path of the packed tree (default: TMPDIR/r1jax-src-NAME.tar.gz)")
    sp.add_argument("--root", default=REPO_ROOT, help=argparse.SUPPRESS)
    sp.add_argument("--extras", default="tpu", help="pip extras to install (default: tpu)")
    sp.set_defaults(func=cmd_setup)

    sp = add("run", parents=[common, slices, ssh, remote, logf],
                        help="run `python -m r1jax.main` on every worker (nohup, log per worker)",
                        description="Start the same `python -m r1jax.main --config C --workdir W [overrides]` on "
                                    "every worker, detached (nohup) with a log file per worker. Overrides: "
                                    "--config.a.b=value args, or anything after `--`.")
    sp.add_argument("--config", required=True, help="e.g. configs/r1.py or configs/sft.py:tiny")
    sp.add_argument("--workdir", required=True, help="gs://BUCKET/PATH (required on multi-host slices)")
    accel_arg(sp, required=False)
    sp.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the job (repeatable)")
    sp.add_argument("--compilation-cache", metavar="DIR",
                    help="set JAX_COMPILATION_CACHE_DIR (e.g. gs://BUCKET/jax-cache)")
    sp.add_argument("--allow-local-workdir", action="store_true",
                    help="allow a non-gs:// workdir when --accelerator is not given (single-host only)")
    sp.set_defaults(func=cmd_run)

    sp = add("logs", parents=[common, slices, ssh, logf], help="tail the log of one worker (or all)")
    sp.add_argument("--worker", default="0", help="worker index, or `all` (default 0)")
    sp.add_argument("--node", type=int,
                    help="slice index of a multi-slice queued resource: node NAME-i (default 0 if --node-count > 1)")
    sp.add_argument("--lines", type=int, default=100, help="lines of history (default 100)")
    sp.add_argument("--follow", action=argparse.BooleanOptionalAction, default=None,
                    help="keep following (default: yes for one worker, no for all)")
    sp.set_defaults(func=cmd_logs)

    sp = add("stop", parents=[common, slices, ssh, logf],
                        help="SIGTERM the job on every worker (the trainer checkpoints, then exits)")
    sp.set_defaults(func=cmd_stop)

    for cmd, helptext, func in (("status", "describe the TPU VM or queued resource", cmd_status),
                                ("delete", "delete the TPU VM, or the queued resource and its nodes", cmd_delete)):
        sp = add(cmd, parents=[common, slices], help=helptext)
        sp.add_argument("--queued", action="store_true",
                        help="NAME is a queued resource (implied by --node-count > 1)")
        sp.set_defaults(func=func)

    sp = add("pack", help="tar the working tree (what `setup` copies to the workers)")
    sp.add_argument("--output", required=True)
    sp.add_argument("--root", default=REPO_ROOT, help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_pack)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args, split_passthrough(extras))
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return args.func(args)
    except CommandFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.rc
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
