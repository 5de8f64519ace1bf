"""launch/tpu.py: exact gcloud commands from --dry-run, input validation, and the remote shell snippets.

Nothing here talks to Google Cloud: a guard `gcloud` that fails loudly is put first on PATH for every
test, the non-dry-run tests use a fake `gcloud` that records its argv, and the remote commands of
`setup` / `run` / `logs` / `stop` are executed locally with bash in a throwaway $HOME.
"""
import importlib.util
import os
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu.py")

_spec = importlib.util.spec_from_file_location("r1jax_launch_tpu", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tpu  # dataclasses look the module up
_spec.loader.exec_module(tpu)

LOC = ["--zone", "us-east5-a", "--project", "my-proj"]
ZP = "--zone=us-east5-a --project=my-proj"


def _write_exe(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No env defaults, and a guard gcloud first on PATH so the real SDK can never be invoked."""
    monkeypatch.delenv("R1JAX_ZONE", raising=False)
    monkeypatch.delenv("R1JAX_PROJECT", raising=False)
    guard = tmp_path / "guard-bin"
    guard.mkdir()
    _write_exe(guard / "gcloud", "#!/bin/sh\necho 'guard gcloud: a test tried to run gcloud' >&2\nexit 97\n")
    monkeypatch.setenv("PATH", f"{guard}{os.pathsep}{os.environ['PATH']}")


def run_main(capsys, *argv):
    try:
        rc = tpu.main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def dry(capsys, cmd, *argv):
    rc, out, err = run_main(capsys, cmd, "--dry-run", *argv)
    assert rc == 0, err
    lines = out.splitlines()
    for line in lines:  # every printed line is a comment or valid, canonical shell
        assert line.startswith("# ") or shlex.join(shlex.split(line)) == line
    return lines, err


def remote_command(line):
    """The --command=... value of a printed gcloud ssh line."""
    (cmd,) = [a[len("--command="):] for a in shlex.split(line) if a.startswith("--command=")]
    return cmd


def error(capsys, cmd, *argv):
    rc, out, err = run_main(capsys, cmd, "--dry-run", *argv)
    assert rc != 0 and out == "", (rc, out)
    return err


# ------------------------------------------------------------------------------------------------
# create / queue / wait / delete / status: exact commands
# ------------------------------------------------------------------------------------------------

def test_create_single_host_v5p8(capsys):
    lines, _ = dry(capsys, "create", "--name", "r1-dev", *LOC, "--accelerator", "v5p-8")
    assert lines == [f"gcloud compute tpus tpu-vm create r1-dev {ZP} --accelerator-type=v5p-8 "
                     "--version=v2-alpha-tpuv5"]


def test_create_multi_host_spot_with_version_and_extra_flag(capsys):
    lines, err = dry(capsys, "create", "--name", "pod", "--zone", "us-central2-b", "--accelerator", "v4-32",
                     "--spot", "--version", "tpu-vm-base", "--gcloud-flag=--network=my-net")
    assert lines == ["gcloud compute tpus tpu-vm create pod --zone=us-central2-b --accelerator-type=v4-32 "
                     "--version=tpu-vm-base --spot --network=my-net"]
    assert "16 chips on 4 hosts" in err


def test_queue_v5p512_spot(capsys):
    lines, _ = dry(capsys, "queue", "--name", "r1", *LOC, "--accelerator", "v5p-512", "--spot")
    assert lines == [f"gcloud compute tpus queued-resources create r1 {ZP} --accelerator-type=v5p-512 "
                     "--runtime-version=v2-alpha-tpuv5 --node-id=r1 --spot"]


def test_queue_multislice_v6e256_two_slices(capsys):
    lines, err = dry(capsys, "queue", "--name", "r1", "--zone", "us-east1-d", "--accelerator", "v6e-256",
                     "--node-count", "2", "--spot")
    assert lines == ["gcloud compute tpus queued-resources create r1 --zone=us-east1-d --accelerator-type=v6e-256 "
                     "--runtime-version=v2-alpha-tpuv6e --node-count=2 --node-prefix=r1 --spot"]
    assert "r1-0 .. r1-1" in err and "--config.mesh.dcn.data=2" in err


def test_queue_reserved_best_effort_and_deadline(capsys):
    lines, _ = dry(capsys, "queue", "--name", "r1", *LOC, "--accelerator", "v5e-16", "--reserved",
                   "--valid-until-duration", "6h")
    assert lines == [f"gcloud compute tpus queued-resources create r1 {ZP} --accelerator-type=v5litepod-16 "
                     "--runtime-version=v2-alpha-tpuv5-lite --node-id=r1 --reserved --valid-until-duration=6h"]
    lines, _ = dry(capsys, "queue", "--name", "r1", *LOC, "--accelerator", "v6e-8", "--best-effort")
    assert lines == [f"gcloud alpha compute tpus queued-resources create r1 {ZP} --accelerator-type=v6e-8 "
                     "--runtime-version=v2-alpha-tpuv6e --node-id=r1 --best-effort"]


def test_wait_status_delete(capsys):
    lines, _ = dry(capsys, "wait", "--name", "r1", *LOC)
    assert lines[0].startswith("# poll every 60s until the state is ACTIVE")
    assert lines[1:] == [f"gcloud compute tpus queued-resources describe r1 {ZP} '--format=value(state.state)'"]

    assert dry(capsys, "status", "--name", "r1", *LOC)[0] == [f"gcloud compute tpus tpu-vm describe r1 {ZP}"]
    assert dry(capsys, "status", "--name", "r1", *LOC, "--queued")[0] == [
        f"gcloud compute tpus queued-resources describe r1 {ZP}"]

    assert dry(capsys, "delete", "--name", "r1", *LOC)[0] == [f"gcloud compute tpus tpu-vm delete r1 {ZP} --quiet"]
    qr_delete = [f"gcloud compute tpus queued-resources delete r1 {ZP} --force --quiet"]
    assert dry(capsys, "delete", "--name", "r1", *LOC, "--queued")[0] == qr_delete
    assert dry(capsys, "delete", "--name", "r1", *LOC, "--node-count", "2")[0] == qr_delete


def test_zone_and_project_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("R1JAX_ZONE", "europe-west4-a")
    monkeypatch.setenv("R1JAX_PROJECT", "env-proj")
    lines, _ = dry(capsys, "delete", "--name", "r1")
    assert lines == ["gcloud compute tpus tpu-vm delete r1 --zone=europe-west4-a --project=env-proj --quiet"]
    lines, _ = dry(capsys, "delete", "--name", "r1", "--zone", "us-east5-a")  # flags win over the environment
    assert lines == ["gcloud compute tpus tpu-vm delete r1 --zone=us-east5-a --project=env-proj --quiet"]


@pytest.mark.parametrize("spec, gcloud_type, chips, hosts, runtime", [
    ("v5p-8", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-512", "v5p-512", 256, 64, "v2-alpha-tpuv5"),
    ("v5p:4x8x8", "v5p-512", 256, 64, "v2-alpha-tpuv5"),
    ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5e-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-256", "v6e-256", 256, 64, "v2-alpha-tpuv6e"),
    ("V6E:16x16", "v6e-256", 256, 64, "v2-alpha-tpuv6e"),
])
def test_accelerator_names(spec, gcloud_type, chips, hosts, runtime):
    a = tpu.parse_accelerator(spec)
    assert (a.gcloud_type, a.chips, a.hosts, a.runtime) == (gcloud_type, chips, hosts, runtime)


# ------------------------------------------------------------------------------------------------
# setup / run / logs / stop: exact commands
# ------------------------------------------------------------------------------------------------

INSTALL = ('cd "$HOME"/r1jax; python3 -m pip --version > /dev/null 2>&1 || '
           '{ sudo apt-get update -qq && sudo apt-get install -y -qq python3-pip; }; '
           'python3 -m pip install --upgrade pip setuptools wheel; '
           "python3 -m pip install -e '.[tpu]'; "
           "python3 -c 'import socket, jax, r1jax; print(socket.gethostname(), \"r1jax ready, jax\", jax.__version__)'")


def test_setup_copies_the_working_tree_to_all_workers(capsys):
    lines, _ = dry(capsys, "setup", "--name", "r1", *LOC, "--tarball", "/tmp/src.tgz")
    assert len(lines) == 3
    assert lines[0] == f"python3 {shlex.quote(SCRIPT)} pack --output=/tmp/src.tgz"
    assert lines[1] == f"gcloud compute tpus tpu-vm scp /tmp/src.tgz r1:r1jax-src.tar.gz --worker=all {ZP}"
    assert shlex.split(lines[2])[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "r1", "--worker=all",
                                         "--zone=us-east5-a"]
    assert remote_command(lines[2]) == (
        'set -e; rm -rf "$HOME"/r1jax.new; mkdir -p "$HOME"/r1jax.new; '
        'tar -xzf "$HOME"/r1jax-src.tar.gz -C "$HOME"/r1jax.new; rm -rf "$HOME"/r1jax; '
        'mv "$HOME"/r1jax.new "$HOME"/r1jax; ' + INSTALL)
    # the default tarball lives in the temp dir and is named after the TPU
    lines, _ = dry(capsys, "setup", "--name", "r1", *LOC)
    assert tpu.default_tarball("r1") in lines[0] and tpu.default_tarball("r1") in lines[1]


def test_setup_git_clone_on_every_slice(capsys):
    lines, _ = dry(capsys, "setup", "--name", "r1", *LOC, "--node-count", "2",
                   "--repo-url", "https://github.com/me/r1jax.git", "--ref", "main")
    assert len(lines) == 1
    assert shlex.split(lines[0])[:10] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "r1",
                                          "--worker=all", "--node=all", "--zone=us-east5-a", "--project=my-proj"]
    assert remote_command(lines[0]) == (
        'set -e; if [ ! -d "$HOME"/r1jax/.git ]; then git clone https://github.com/me/r1jax.git "$HOME"/r1jax; fi; '
        'git -C "$HOME"/r1jax fetch origin main; git -C "$HOME"/r1jax checkout --force FETCH_HEAD; ' + INSTALL)
    # multi-slice tarball copy goes to every node too
    lines, _ = dry(capsys, "setup", "--name", "r1", *LOC, "--node-count", "2", "--tarball", "/tmp/src.tgz")
    assert lines[1] == (f"gcloud compute tpus queued-resources scp /tmp/src.tgz r1:r1jax-src.tar.gz "
                        f"--worker=all --node=all {ZP}")


def test_run_on_all_workers_with_gs_workdir(capsys):
    lines, _ = dry(capsys, "run", "--name", "r1", *LOC, "--accelerator", "v5p-512", "--config", "configs/r1.py",
                   "--workdir", "gs://my-bucket/runs/r1", "--compilation-cache", "gs://my-bucket/jax-cache",
                   "--env", "TPU_STDERR_LOG_LEVEL=0", "--config.train.steps=100", "--", "--config.seed", "3")
    assert len(lines) == 1
    assert shlex.split(lines[0])[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "r1", "--worker=all",
                                         "--zone=us-east5-a"]
    main = ("python3 -m r1jax.main --config configs/r1.py --workdir gs://my-bucket/runs/r1 "
            "--config.train.steps=100 --config.seed 3")
    pid, log = '"$HOME"/r1jax-logs/r1jax.pid', '"$HOME"/r1jax-logs/r1jax.log'
    assert remote_command(lines[0]) == (
        f'set -e; mkdir -p "$HOME"/r1jax-logs; '
        f'if [ -f {pid} ] && grep -qs r1jax.main /proc/"$(cat {pid})"/cmdline; then '
        f'echo "r1jax is already running on $(hostname) (pid $(cat {pid})); use stop first" >&2; exit 1; fi; '
        f'cd "$HOME"/r1jax; '
        f'echo "=== $(date -u +%FT%TZ) $(hostname):" {shlex.quote(main)} >> {log}; '
        f"nohup env JAX_COMPILATION_CACHE_DIR=gs://my-bucket/jax-cache TPU_STDERR_LOG_LEVEL=0 {main} "
        f">> {log} 2>&1 < /dev/null & echo $! > {pid}; "
        f'echo "started r1jax on $(hostname) (pid $(cat {pid})), log:" r1jax-logs/r1jax.log')


def test_run_multislice_uses_every_node(capsys):
    lines, err = dry(capsys, "run", "--name", "r1", *LOC, "--node-count", "2", "--config", "configs/r1.py",
                     "--workdir", "gs://my-bucket/runs/r1", "--config.mesh.dcn.data=2")
    assert shlex.split(lines[0])[:8] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "r1",
                                         "--worker=all", "--node=all"]
    assert "--config.mesh.dcn.data=2 >>" in remote_command(lines[0])
    assert "dcn" not in err  # no reminder when the DCN mesh is set
    _, err = dry(capsys, "run", "--name", "r1", *LOC, "--node-count", "2", "--config", "configs/r1.py",
                 "--workdir", "gs://my-bucket/runs/r1")
    assert "--config.mesh.dcn.data=2" in err


def test_logs_and_stop(capsys):
    lines, _ = dry(capsys, "logs", "--name", "r1", *LOC, "--worker", "3")
    assert lines == [f"gcloud compute tpus tpu-vm ssh r1 --worker=3 {ZP} "
                     "'--command=tail -n 100 -F \"$HOME\"/r1jax-logs/r1jax.log'"]
    lines, _ = dry(capsys, "logs", "--name", "r1", *LOC, "--worker", "all", "--lines", "5")
    assert remote_command(lines[0]) == 'tail -n 5 "$HOME"/r1jax-logs/r1jax.log'  # no -F across all workers
    lines, _ = dry(capsys, "logs", "--name", "r1", *LOC, "--node-count", "2", "--node", "1")
    assert shlex.split(lines[0])[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "r1-1", "--worker=0"]

    lines, _ = dry(capsys, "stop", "--name", "r1", *LOC)
    assert shlex.split(lines[0])[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "r1", "--worker=all"]
    assert 'kill -TERM "$(cat "$HOME"/r1jax-logs/r1jax.pid)"' in remote_command(lines[0])


def test_cli_entry_point_matches_main(capsys):
    argv = ["create", "--name", "r1", *LOC, "--accelerator", "v6e-8"]
    proc = subprocess.run([sys.executable, SCRIPT, *argv, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == dry(capsys, *argv)[0]


def test_every_command_in_the_readme_dry_runs(capsys, monkeypatch):
    import re
    monkeypatch.setenv("R1JAX_ZONE", "us-east5-a")
    with open(os.path.join(ROOT, "launch", "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = [line.split("  #")[0] for b in blocks for line in b.replace("\\\n", " ").splitlines()
                if line.startswith("python launch/tpu.py")]
    assert len(commands) >= 20
    for command in commands:
        argv = shlex.split(command)[2:]
        lines, _ = dry(capsys, *argv)
        assert lines and all(line.startswith(("gcloud ", "python3 ", "# ")) for line in lines), command


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["create", "--name", "r1", *LOC, "--accelerator", "v5p512"], "unknown accelerator type 'v5p512'"),
    (["create", "--name", "r1", *LOC, "--accelerator", "v7x-8"], "unknown accelerator type 'v7x-8'"),
    (["create", "--name", "r1", *LOC, "--accelerator", "v5p-12"], "not a valid v5p slice"),
    (["queue", "--name", "r1", *LOC, "--accelerator", "v6e-512"], "not a valid v6e slice"),
    (["create", "--name", "r1", "--accelerator", "v5p-8"], "missing --zone"),
    (["create", "--name", "r1", "--zone", "us-east5", "--accelerator", "v5p-8"], "looks like a region"),
    (["create", "--name", "r1", *LOC, "--accelerator", "v6e-256", "--node-count", "2"],
     "multi-slice needs queued resources"),
    (["create", "--name", "My_TPU", *LOC, "--accelerator", "v5p-8"], "invalid --name"),
    (["queue", "--name", "r1", *LOC, "--accelerator", "v5p-8", "--node-count", "0"], "--node-count must be >= 1"),
    (["run", "--name", "r1", *LOC, "--accelerator", "v5p-512", "--config", "configs/r1.py", "--workdir",
      "/home/me/run"], "local path on a multi-host job (v5p-512 (64 hosts))"),
    (["run", "--name", "r1", *LOC, "--node-count", "2", "--config", "configs/r1.py", "--workdir", "runs/r1"],
     "local path on a multi-host job (2 slices)"),
    (["run", "--name", "r1", *LOC, "--config", "configs/r1.py", "--workdir", "/tmp/run"], "is not on gs://"),
    (["run", "--name", "r1", *LOC, "--config", "configs/r1.py", "--workdir", "s3://bucket/run"], "only gs://"),
    (["run", "--name", "r1", *LOC, "--config", "configs/r1.py", "--workdir", "gs://B/x"], "not a valid gs://"),
    (["run", "--name", "r1", *LOC, "--config", "configs/r1.py", "--workdir", "gs://my-bucket/x", "--zon", "x"],
     "unrecognized argument '--zon'"),
    (["run", "--name", "r1", *LOC, "--config", "configs/r1.py", "--workdir", "gs://my-bucket/x", "--env", "1=2"],
     "expected KEY=VALUE"),
    (["logs", "--name", "r1", *LOC, "--worker", "first"], "--worker must be a worker index"),
    (["logs", "--name", "r1", *LOC, "--node-count", "2", "--node", "2"], "out of range"),
    (["setup", "--name", "r1", *LOC, "--remote-dir", "~"], "invalid --remote-dir"),
    (["create", "--name", "r1", *LOC, "--accelerator", "v5p-8", "--spot", "--reserved"], "not allowed with"),
    (["delete", "--name", "r1", *LOC, "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_a_clear_error(capsys, argv, message):
    assert message in error(capsys, *argv)


def test_dry_run_after_double_dash_is_refused(capsys):
    rc, out, err = run_main(capsys, "run", "--name", "r1", *LOC, "--config", "c.py", "--workdir",
                            "gs://my-bucket/x", "--", "--dry-run")
    assert rc == 2 and out == "" and "put it before `--`" in err


def test_single_host_local_workdir_only_warns(capsys):
    lines, err = dry(capsys, "run", "--name", "r1", *LOC, "--accelerator", "v5p-8", "--config", "configs/r1.py",
                     "--workdir", "/tmp/run")
    assert len(lines) == 1 and "lost when the VM is preempted" in err
    lines, err = dry(capsys, "run", "--name", "r1", *LOC, "--allow-local-workdir", "--config", "configs/r1.py",
                     "--workdir", "/tmp/run")
    assert len(lines) == 1 and "warning" in err


# ------------------------------------------------------------------------------------------------
# without --dry-run: subprocess, fake gcloud
# ------------------------------------------------------------------------------------------------

def test_missing_gcloud_fails_loudly(capsys, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    rc, out, err = run_main(capsys, "create", "--name", "r1", *LOC, "--accelerator", "v5p-8")
    assert rc == 2 and "gcloud not found on PATH" in err and "--dry-run" in err
    rc, _, err = run_main(capsys, "wait", "--name", "r1", *LOC)
    assert rc == 2 and "gcloud not found on PATH" in err


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A gcloud that appends its argv (one shell-quoted line per call) to calls.txt; describe prints
    the next state from states.txt; exits with the code in rc.txt (default 0)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "gcloud", f"""#!{sys.executable}
import shlex, sys, pathlib
d = pathlib.Path({str(tmp_path)!r})
with open(d / "calls.txt", "a") as f:
    f.write(shlex.join(["gcloud", *sys.argv[1:]]) + "\\n")
if "describe" in sys.argv:
    states = (d / "states.txt").read_text().split()
    (d / "states.txt").write_text("\\n".join(states[1:] or states))
    print(states[0])
rc = d / "rc.txt"
sys.exit(int(rc.read_text()) if rc.exists() else 0)
""")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_runs_the_printed_commands(capsys, fake_gcloud):
    argv = ["queue", "--name", "r1", *LOC, "--accelerator", "v6e-256", "--node-count", "2", "--spot"]
    printed, _ = dry(capsys, *argv)
    rc, out, err = run_main(capsys, *argv)
    assert rc == 0
    assert (fake_gcloud / "calls.txt").read_text().splitlines() == printed
    assert "+ " + printed[0] in err  # each command is echoed before it runs


def test_failing_gcloud_command_propagates(capsys, fake_gcloud):
    (fake_gcloud / "rc.txt").write_text("3")
    rc, _, err = run_main(capsys, "delete", "--name", "r1", *LOC)
    assert rc == 3 and "command failed (exit code 3)" in err


def test_wait_polls_until_active(capsys, fake_gcloud):
    (fake_gcloud / "states.txt").write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    rc, out, _ = run_main(capsys, "wait", "--name", "r1", *LOC, "--interval", "0")
    assert rc == 0
    assert [line.split("] ")[1] for line in out.splitlines()] == [
        "r1: WAITING_FOR_RESOURCES", "r1: PROVISIONING", "r1: ACTIVE"]
    assert (fake_gcloud / "calls.txt").read_text().splitlines()[0] == (
        f"gcloud compute tpus queued-resources describe r1 {ZP} '--format=value(state.state)'")


def test_wait_fails_on_preempted_or_failed(capsys, fake_gcloud):
    (fake_gcloud / "states.txt").write_text("PROVISIONING\nSUSPENDED\n")
    rc, _, err = run_main(capsys, "wait", "--name", "r1", *LOC, "--interval", "0")
    assert rc == 2 and "is SUSPENDED" in err


def test_setup_packs_the_tree_then_copies(capsys, fake_gcloud, tmp_path):
    tarball = tmp_path / "src.tgz"
    rc, _, err = run_main(capsys, "setup", "--name", "r1", *LOC, "--tarball", str(tarball))
    assert rc == 0, err
    calls = (fake_gcloud / "calls.txt").read_text().splitlines()
    assert [shlex.split(c)[3:5] for c in calls] == [["tpu-vm", "scp"], ["tpu-vm", "ssh"]]
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    assert "setup.py" in names and "launch/tpu.py" in names
    assert not any(n == ".git" or n.startswith(".git/") or "__pycache__" in n for n in names)


# ------------------------------------------------------------------------------------------------
# the remote shell snippets, executed locally on a simulated worker
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses bash and /proc")
def test_remote_commands_on_a_simulated_worker(capsys, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "worker-bin"
    bin_dir.mkdir()
    # python3 on the "worker": records pip calls; r1jax.main trains until SIGTERM, then checkpoints and exits
    _write_exe(bin_dir / "python3", """#!/bin/bash
echo "python3 $*" >> "$HOME/calls.txt"
if [ "$2" = "r1jax.main" ]; then
  trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
  echo "training with FOO=$FOO args: $*"
  for i in $(seq 200); do sleep 0.05; done
fi
""")
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def on_worker(line):
        return subprocess.run(["bash", "-c", remote_command(line)], env=env, cwd=home, capture_output=True,
                              text=True, timeout=30)

    def wait_for(path, text):
        for _ in range(200):
            if path.exists() and text in path.read_text():
                return
            time.sleep(0.025)
        raise AssertionError(f"{text!r} never appeared in {path}")

    # setup: the tarball `setup` copies is unpacked into ~/r1jax (replacing the old copy) and pip-installed.
    # A small tree that is not a git checkout: pack walks it and skips .git, caches and egg-info.
    src = tmp_path / "src"
    for f in ("setup.py", "r1jax/__init__.py", "configs/r1.py", ".git/HEAD", "r1jax/__pycache__/x.pyc",
              "r1jax.egg-info/PKG-INFO"):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text("x")
    (home / "r1jax").mkdir()
    (home / "r1jax" / "stale.py").write_text("old")
    tpu.pack_tree(str(home / "r1jax-src.tar.gz"), str(src))
    setup = dry(capsys, "setup", "--name", "r1", *LOC)[0]
    r = on_worker(setup[2])
    assert r.returncode == 0, r.stderr
    unpacked = sorted(str(p.relative_to(home / "r1jax")) for p in (home / "r1jax").rglob("*") if p.is_file())
    assert unpacked == ["configs/r1.py", "r1jax/__init__.py", "setup.py"]
    assert not (home / "r1jax.new").exists()
    assert "python3 -m pip install -e .[tpu]" in (home / "calls.txt").read_text()

    # run: detached, args pass through intact, log + pid per worker
    run = dry(capsys, "run", "--name", "r1", *LOC, "--config", "configs/r1.py", "--workdir", "gs://my-bucket/r",
              "--env", "FOO=a b", "--", "--config.note=it's \"quoted\" $HOME")[0]
    r = on_worker(run[0])
    assert r.returncode == 0 and "started r1jax on" in r.stdout, r.stderr
    log = home / "r1jax-logs" / "r1jax.log"
    pid = int((home / "r1jax-logs" / "r1jax.pid").read_text())
    try:
        wait_for(log, "training with FOO=a b")
        assert "python3 -m r1jax.main --config configs/r1.py --workdir gs://my-bucket/r " \
               "--config.note=it's \"quoted\" $HOME" in (home / "calls.txt").read_text()
        r = on_worker(run[0])  # a second start is refused while the job runs
        assert r.returncode == 1 and "already running" in r.stderr

        r = on_worker(dry(capsys, "logs", "--name", "r1", *LOC, "--no-follow")[0][0])
        assert r.returncode == 0 and "training with" in r.stdout

        r = on_worker(dry(capsys, "stop", "--name", "r1", *LOC)[0][0])
        assert f"sent SIGTERM to r1jax (pid {pid})" in r.stdout
        wait_for(log, "SIGTERM: checkpoint saved")
    finally:
        try:
            os.kill(pid, 15)  # only the fake job this test started
        except ProcessLookupError:
            pass
    for _ in range(200):  # once it has exited, stop reports that nothing runs
        r = on_worker(dry(capsys, "stop", "--name", "r1", *LOC)[0][0])
        if "not running" in r.stdout:
            break
        time.sleep(0.025)
    assert "r1jax is not running" in r.stdout
