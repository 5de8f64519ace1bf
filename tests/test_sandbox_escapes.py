"""The sandbox against the escape routes of issue 20, one class each (tests/sandbox_corpus.py):
forging the verdict from inside the interpreter, memory past the bound, host IPC, the trainer's
keyring, and the no-namespace fallback. Every program is scored through rewards.score and must earn
nothing; each run must end within its limits and its measured memory within the one bound; the host
socket, FIFO, abstract socket, TCP listener and session key made here must be untouched.
"""
import ctypes
import dataclasses
import os
import secrets
import shutil
import socket
import tempfile

import pytest

import sandbox_corpus as corpus
from r1jax.rl.sandbox import SandboxLimits, run_test

CORPUS_LIMITS = SandboxLimits(timeout_s=4.0, cpu_s=3, memory_bytes=128 << 20, max_processes=4,
                              max_disk_bytes=32 << 20, max_file_bytes=16 << 20)
OLD_BOUND = CORPUS_LIMITS.max_processes * CORPUS_LIMITS.memory_bytes  # what the attacks aim past
_SYS_ADD_KEY, _SYS_KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(os.uname().machine, (None, None))


def keyctl(*args):
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_KEYCTL, *args)


def read_key(key: int) -> bytes | None:
    buf = ctypes.create_string_buffer(256)
    size = keyctl(11, ctypes.c_long(key), buf, 256)  # KEYCTL_READ
    return None if size < 0 else buf.raw[:size]


@pytest.fixture(scope="module")
def trainer_side():
    """What the hostile programs aim at: a host unix socket and FIFO (mode 666, outside /tmp), an
    abstract unix socket, a TCP listener, and a key in this process's session keyring."""
    ipc_dir = tempfile.mkdtemp(prefix="r1jax-ipc-", dir="/run" if os.access("/run", os.W_OK) else None)
    os.chmod(ipc_dir, 0o777)
    sock_path, fifo_path = os.path.join(ipc_dir, "host.sock"), os.path.join(ipc_dir, "host.fifo")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(sock_path)
    os.chmod(sock_path, 0o666)
    unix.listen(8)
    unix.setblocking(False)
    os.mkfifo(fifo_path, 0o666)
    os.chmod(fifo_path, 0o666)
    fifo = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    keep_writer = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)  # reads give EAGAIN, not EOF
    abstract_name = "r1jax-test-" + secrets.token_hex(6)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + abstract_name)
    abstract.listen(8)
    abstract.setblocking(False)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    desc, payload = "r1jax-trainer-" + secrets.token_hex(4), b"key-" + secrets.token_hex(8).encode()
    key = None
    if _SYS_ADD_KEY is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        key = libc.syscall(_SYS_ADD_KEY, b"user", desc.encode(), payload, len(payload), -3)
        key = key if key > 0 else None
    yield {"SOCK": sock_path, "FIFO": fifo_path, "ABSTRACT": abstract_name,
           "PORT": tcp.getsockname()[1], "KEY": key or 0, "DESC": desc, "TOKEN": secrets.token_hex(6),
           "payload": payload, "unix": unix, "abstract": abstract, "tcp": tcp, "fifo": fifo}
    for s in (unix, abstract, tcp):
        s.close()
    os.close(fifo)
    os.close(keep_writer)
    if key:
        keyctl(9, ctypes.c_long(key), ctypes.c_long(-3))  # KEYCTL_UNLINK
    shutil.rmtree(ipc_dir, ignore_errors=True)


def assert_trainer_side_untouched(side):
    for listener in (side["unix"], side["abstract"], side["tcp"]):
        with pytest.raises(BlockingIOError):
            listener.accept()
    with pytest.raises(BlockingIOError):
        os.read(side["fifo"], 100)
    if side["KEY"]:
        assert read_key(side["KEY"]) == side["payload"]


def completion(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}```\n"


def run_corpus(programs: dict, limits: SandboxLimits, side: dict, *, each: bool = True):
    """(rewards through rewards.score, RunResult of each program's first test), both batched."""
    from concurrent.futures import ThreadPoolExecutor

    from r1jax.rl import rewards

    names = sorted(programs)
    filled = [corpus.fill(programs[n], side) for n in names]
    tests = [corpus.fill(t, side) for t in corpus.TESTS]
    kwargs = {"limits": dataclasses.asdict(limits), "max_workers": 2}
    total, per_reward, errors = rewards.score([("code", 1.0, kwargs)], [""] * len(names),
                                              [completion(p) for p in filled],
                                              {"tests": [tests] * len(names)})
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: run_test(p, tests[0], limits=limits), filled if each else []))
    return dict(zip(names, total)), errors["code"], dict(zip(names, results))


@pytest.fixture(scope="module")
def corpus_runs(trainer_side):
    programs = {f"{cls}/{name}": program for cls, group in corpus.CLASSES.items()
                for name, program in group.items()}
    return run_corpus(programs, CORPUS_LIMITS, trainer_side)


def test_the_corpus_covers_every_class_with_40_programs():
    assert sum(map(len, corpus.CLASSES.values())) + len(corpus.FALLBACK) >= 40
    assert all(len(group) >= 2 for group in corpus.CLASSES.values())


def test_no_hostile_program_earns_anything(corpus_runs):
    rewards_by_name, errors, results = corpus_runs
    assert errors == 0
    assert {n: r for n, r in rewards_by_name.items() if r != 0.0} == {}
    assert {n: r.error for n, r in results.items() if r.passed} == {}


def test_every_hostile_run_ends_within_its_limits_and_memory_bound(corpus_runs):
    _, _, results = corpus_runs
    for name, result in results.items():
        assert result.wall_s < CORPUS_LIMITS.timeout_s + 2.0, name
        assert len(result.stdout) <= CORPUS_LIMITS.max_output_bytes, name
        features = set(result.isolation.split(","))
        assert {"netns", "pidns", "mntns", "ipcns", "minroot", "keyring"} <= features, name
        if "memcg" in features:  # the measured peak of the whole run, all processes together
            assert 0 < result.memory_peak_bytes <= CORPUS_LIMITS.memory_bytes, name
        else:
            assert "seccomp" in features, name


def test_memory_attacks_never_hold_more_than_the_bound(corpus_runs):
    _, _, results = corpus_runs
    bound = CORPUS_LIMITS.memory_bytes
    if "memcg" not in results["memory/memfd_files"].isolation:
        bound = OLD_BOUND + CORPUS_LIMITS.max_disk_bytes  # the documented bound without a cgroup
    for name, result in results.items():
        for line in result.stdout.splitlines():
            if line.startswith("HELD "):
                assert int(line.split()[1]) <= bound, (name, line)
    # Routes that the filter closes fail outright rather than at the bound.
    for name, route in (("sysv_shm_in_turn", "shmget"), ("nested_user_namespace_tmpfs", "unshare user+mount"),
                        ("clone_with_new_user_namespace", "clone NEWUSER")):
        out = results[f"memory/{name}"].stdout
        if "seccomp" in results[f"memory/{name}"].isolation:
            assert f"{route} -1 EPERM" in out, (name, out)
    assert "HELD 0" in results["memory/memfd_files"].stdout or "memcg" in results["memory/memfd_files"].isolation
    children = results["memory/processes_each_at_the_rlimit"].stdout
    assert "CHILDREN" not in children or "0, 0, 0]" not in children  # not all three held 100 MiB


def test_nothing_of_the_test_reaches_the_program(corpus_runs, trainer_side):
    _, _, results = corpus_runs
    token = f"leak-token-{trainer_side['TOKEN']}"
    for name, result in results.items():
        assert token not in result.stdout + result.stderr, name
        if trainer_side["KEY"]:
            assert trainer_side["payload"].decode() not in result.stdout, name


def test_host_ipc_and_the_trainers_keyring_are_untouched(corpus_runs, trainer_side):
    _, _, results = corpus_runs
    assert_trainer_side_untouched(trainer_side)
    for name in ("host_unix_socket", "host_abstract_socket", "tcp_to_the_host"):
        assert "CONNECTED" not in results[f"ipc/{name}"].stdout
    # The scan walks the whole minimal root (all of /usr): on a loaded machine it needs more than the corpus's
    # 4 s, so it runs once more on its own with room to finish, and both runs must reach nothing.
    scan = corpus.fill(corpus.CLASSES["ipc"]["scan_for_sockets_and_fifos"], trainer_side)
    patient = run_test(scan, corpus.fill(corpus.TESTS[0], trainer_side),
                       limits=dataclasses.replace(CORPUS_LIMITS, timeout_s=60.0, cpu_s=30))
    for result in (results["ipc/scan_for_sockets_and_fifos"], patient):
        assert "REACHED" not in result.stdout
    assert "FOUND 0" in patient.stdout, patient  # none in the minimal root
    if not trainer_side["KEY"]:
        pytest.skip("no session keyring in this process")
    assert "GOT b'\\x00" in results["keyring/read_the_trainers_key"].stdout


def test_the_fallback_refuses_by_default_and_holds_network_when_allowed(trainer_side):
    honest = {"honest": "def f(x):\n    return x * x + 13\n"}
    refused, errors, _ = run_corpus(honest, SandboxLimits(timeout_s=3.0, namespaces=False), trainer_side,
                                    each=False)
    with pytest.raises(RuntimeError, match="allow_unsafe"):
        run_test(honest["honest"], "pass", limits=SandboxLimits(namespaces=False))
    assert refused == {"honest": 0.0} and errors == 1  # the code reward refuses: counted as an error
    unsafe = SandboxLimits(timeout_s=3.0, namespaces=False, allow_unsafe=True)
    assert run_corpus(honest, unsafe, trainer_side)[0] == {"honest": 1.0}
    rewards_by_name, errors, results = run_corpus(corpus.FALLBACK, unsafe, trainer_side)
    assert errors == 0 and set(rewards_by_name.values()) == {0.0}
    for name, result in results.items():
        assert "unsafe" in result.isolation and "CONNECTED" not in result.stdout, name
    assert_trainer_side_untouched(trainer_side)
