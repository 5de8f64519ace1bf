"""The sandbox against hostile programs: each attack earns nothing, ends within its limits and
leaves this (the trainer's) process, its environment, files and network untouched.

Hostile programs are paired with a test that asserts the attack worked, so a share of 0 means the
attack failed; host-side effects are checked from here, after the run.
"""
import dataclasses
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import sandbox_corpus as corpus
from r1jax.rl import sandbox
from r1jax.rl.sandbox import SandboxLimits, run_many, run_program, run_test, run_tests

FAST = SandboxLimits(timeout_s=2.0, cpu_s=2, memory_bytes=256 << 20, max_processes=32)
SECRET_NAME = "R1JAX_TEST_SECRET"
SECRET = "s3cr3t-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Canaries and a secret in this process's environment, checked again by the last test.

    One canary sits in pytest's tmp dir (under /tmp, which the sandbox replaces); the other in a
    world-writable directory outside /tmp that the sandbox does see, so only the read-only host
    mounts protect it."""
    canary = tmp_path_factory.mktemp("host") / "canary.txt"
    canary.write_text("alive")
    exposed_dir = tempfile.mkdtemp(prefix="r1jax-canary-", dir="/run" if os.access("/run", os.W_OK)
                                   else os.path.dirname(os.path.abspath(__file__)))
    os.chmod(exposed_dir, 0o777)
    exposed = pathlib.Path(exposed_dir) / "canary.txt"
    exposed.write_text("alive")
    os.chmod(exposed, 0o666)
    os.environ[SECRET_NAME] = SECRET
    yield {"canary": canary, "exposed": exposed, "pid": os.getpid()}
    os.environ.pop(SECRET_NAME, None)
    shutil.rmtree(exposed_dir, ignore_errors=True)


def processes_named(name: str) -> list[int]:
    """Live (non-zombie) processes whose comm or command line contains `name`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                comm_state = f.read()
        except OSError:
            continue
        if (name in cmdline or f"({name}" in comm_state) and ") Z " not in comm_state:
            found.append(int(pid))
    return found


def assert_none_left(name: str) -> None:
    deadline = time.monotonic() + 2.0
    while processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_named(name) == []


def code(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


# ---------------------------------------------------------------- honest programs


def test_correct_and_partial_programs_get_their_share():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
    right = "def add(a, b):\n    return a + b\n"
    partial = "def add(a, b):\n    return a + b if a > 0 else 7\n"
    wrong = "def add(a, b):\n    return a * b\n"
    assert run_tests(right, tests, limits=FAST, max_workers=2) == 1.0
    items = [(right, tests), (partial, tests), (wrong, tests), ("syntax error(", tests[:1])]
    assert run_many(items, limits=FAST, max_workers=2) == [1.0, 2 / 3, 1 / 3, 0.0]


def test_run_many_runs_each_distinct_program_and_test_once(monkeypatch):
    calls = []
    real = sandbox.run_test
    monkeypatch.setattr(sandbox, "run_test", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]
    right, wrong = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a * b\n"
    items = [(right, tests), (wrong, tests), (right, tests), (right, tests[:1])]
    assert run_many(items, limits=FAST, max_workers=2) == [1.0, 2 / 3, 1.0, 1.0]
    assert sorted(calls) == sorted({(p, t) for p in (right, wrong) for t in tests})


def test_run_program_reads_stdin_and_reports_output_and_isolation():
    result = run_program("import sys\nprint(sum(map(int, sys.stdin.read().split())))\n",
                         stdin="1 2 3\n40\n", limits=FAST)
    assert result.ok and result.stdout == "46\n" and result.stderr == ""
    assert result.isolation  # names the mechanisms actually used
    failing = run_program("raise ValueError('boom')", limits=FAST)
    assert not failing.ok and failing.returncode == 1 and "ValueError: boom" in failing.stderr


def test_a_program_can_use_the_standard_library_and_its_own_directory():
    result = run_program(code("""
        import collections, json, math, os, tempfile
        with open("scratch.txt", "w") as f:
            f.write("x" * 1000)
        with tempfile.TemporaryFile() as t:
            t.write(b"ok")
        print(json.dumps([math.isqrt(17), sorted(collections.Counter("aab").items()),
                          os.path.getsize("scratch.txt")]))
    """), limits=FAST)
    assert result.ok, result.stderr
    assert result.stdout == '[4, [["a", 2], ["b", 1]], 1000]\n'


def test_honest_programs_with_threads_and_child_interpreters_pass():
    threads = code("""
        import threading
        results = {}
        def work(i):
            results[i] = sum(range(i * 1000))
        workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for w in workers: w.start()
        for w in workers: w.join()
        def f(x):
            return x * x + 13 if len(results) == 4 else None
    """)
    spawns = code("""
        import subprocess, sys
        out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
        def f(x):
            return x * x + 13 if out.stdout == "42\\n" else out.stderr
    """)
    pipes = code("""
        import multiprocessing
        def square(conn):
            conn.send(conn.recv() ** 2)
        def f(x):
            mine, theirs = multiprocessing.Pipe()
            child = multiprocessing.get_context("fork").Process(target=square, args=(theirs,))
            child.start()
            mine.send(x)
            value = mine.recv()
            child.join()
            return value + 13
    """)
    tests = ["assert f(3) == 22", "assert f(5) == 38"]
    roomy = dataclasses.replace(FAST, timeout_s=15.0)  # a second interpreter's start on a loaded machine
    assert run_many([(p, tests) for p in (threads, spawns, pipes)], limits=roomy, max_workers=2) == [1.0] * 3


def test_humaneval_shaped_tests_run_in_the_evaluator():
    """A check(candidate) with helpers, tolerances, tuples, dicts, sets, keyword arguments, a name
    the test takes from the program (a helper and a constant) and exceptions the test expects."""
    program = code("""
        import math
        SCALE = 2
        def helper(xs):
            return [SCALE * x for x in xs]
        def solve(xs, *, mode="sum"):
            if not xs:
                raise ValueError("empty")
            doubled = helper(xs)
            return (sum(doubled), {"n": len(xs), mode: True}, set(doubled), math.sqrt(sum(xs)))
    """)
    test = code("""
        import math
        def approx(a, b):
            return abs(a - b) < 1e-9
        def check(candidate):
            total, info, seen, root = candidate([1, 2, 3], mode="all")
            assert total == 12 and info == {"n": 3, "all": True} and seen == {2, 4, 6}
            assert approx(root, math.sqrt(6)) and type(total) is int
            assert candidate((4,))[0] == 8 and helper([5]) == [10] and SCALE == 2
            try:
                candidate([])
            except ValueError as e:
                assert "empty" in str(e)
            else:
                raise AssertionError("expected ValueError")
        check(solve)
    """)
    result = run_test(program, test, limits=FAST)
    assert result.ok, (result.error, result.stderr)
    assert result.passed and result.returncode == 0 and result.stderr == "" and result.error is None
    wrong = program.replace("SCALE * x", "SCALE * x + 1")
    failed = run_test(wrong, test, limits=FAST)
    assert not failed.ok and failed.error.startswith("AssertionError")


def test_a_test_cannot_take_a_builtin_from_the_program():
    program = "def abs(x):\n    return 0\ndef f(x):\n    return 1.5\n"
    assert run_tests(program, ["assert abs(f(1) - 1.0) < 1e-6"], limits=FAST) == 0.0


def test_stdin_with_a_lone_surrogate_is_a_value_error():
    with pytest.raises(ValueError, match="stdin: not encodable as UTF-8"):
        run_program("print(1)", stdin="bad \udc80 input", limits=FAST)
    with pytest.raises(ValueError, match="program: not encodable"):
        run_test("x = '\udc80'", "pass", limits=FAST)


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="non-empty list"):
        run_many([("def f(): pass", [])])
    with pytest.raises(TypeError, match="program"):
        run_test(b"print(1)", "pass")


def test_a_sandbox_that_cannot_start_raises_instead_of_failing_the_program(monkeypatch):
    monkeypatch.setattr(sandbox, "_CHILD_SCRIPT", "/nonexistent/sandbox.py")
    with pytest.raises(RuntimeError, match="sandbox failed to start"):
        run_program("print(1)", limits=FAST)


# ---------------------------------------------------------------- hostile programs


def test_fork_bomb_is_capped_and_fully_killed():
    name = "bomb" + secrets.token_hex(4)
    bomb = code(f"""
        import ctypes, os
        ctypes.CDLL(None).prctl(15, b"{name}", 0, 0, 0)  # PR_SET_NAME: comm that we can find
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    start = time.monotonic()
    assert run_tests(bomb, ["pass"], limits=FAST) == 0.0
    assert time.monotonic() - start < FAST.timeout_s + 5
    assert_none_left(name)


def test_fork_bomb_gets_at_most_max_processes():
    counter = code("""
        import os, time
        forks = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                forks += 1
        except OSError:
            print(forks)
    """)
    result = run_program(counter, limits=FAST)
    assert result.ok, result.stderr
    assert 0 < int(result.stdout) < FAST.max_processes


def test_memory_bomb_fails():
    bombs = ["x = bytearray(8 << 30)", "x = []\nwhile True:\n    x.append(bytearray(1 << 24))"]
    for bomb in bombs:
        # A roomier wall clock than FAST: on a loaded machine the traceback must have time to be written.
        result = run_test(bomb, "assert len(x) > 0", limits=dataclasses.replace(FAST, timeout_s=20.0, cpu_s=10))
        assert not result.ok and "MemoryError" in result.stderr


def test_infinite_loop_and_sleep_time_out():
    limits = SandboxLimits(timeout_s=1.0, cpu_s=5)
    for program in ["while True:\n    pass", "import time\ntime.sleep(60)"]:
        start = time.monotonic()
        result = run_test(program, "pass", limits=limits)
        assert result.timed_out and not result.ok and result.returncode == -9
        assert time.monotonic() - start < 4.0


def test_busy_cpu_loop_hits_the_cpu_limit_before_the_wall_clock():
    result = run_program("while True:\n    pass", limits=SandboxLimits(timeout_s=30.0, cpu_s=1))
    assert not result.timed_out and result.returncode == 128 + 24  # SIGXCPU
    assert result.wall_s < 15.0


def test_canaries_outside_the_directory_cannot_be_deleted(host):
    canaries = [str(host["canary"]), str(host["exposed"]), sandbox.__file__]
    attack = code(f"""
        import os, shutil, sys
        for canary in {canaries!r} + [sys.executable]:
            print(canary, os.path.exists(canary))
            for action in (lambda: os.remove(canary),
                           lambda: shutil.rmtree(os.path.dirname(canary)),
                           lambda: open(canary, "a").write("pwned"),
                           lambda: os.rename(canary, "x")):
                try:
                    action()
                except OSError:
                    pass
    """)
    result = run_program(attack, limits=FAST)
    assert result.ok, result.stderr
    # The minimal root holds none of the host's files, only the interpreter (read-only) ...
    assert all(f"{c} False" in result.stdout for c in canaries)
    assert f"{sys.executable} True" in result.stdout
    assert host["canary"].read_text() == host["exposed"].read_text() == "alive"  # ... all intact
    assert os.path.exists(sys.executable)


def test_files_written_outside_the_directory_never_reach_the_host(host, tmp_path):
    token = secrets.token_hex(6)
    targets = [str(tmp_path / "escape.txt"), f"/tmp/r1jax-escape-{token}",
               f"/var/tmp/r1jax-escape-{token}", f"/dev/shm/r1jax-escape-{token}",
               os.path.join(os.path.dirname(sandbox.__file__), f"escape-{token}.py"),
               os.path.join(os.path.dirname(str(host["canary"])), f"escape-{token}")]
    attack = code(f"""
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                print("wrote", path)
            except OSError as e:
                print("refused", path, type(e).__name__)
    """)
    result = run_program(attack, limits=FAST)
    try:
        assert result.ok, result.stderr
        assert [p for p in targets if os.path.exists(p)] == []
        # Inside, /tmp-like places are private tmpfs (writes succeed there and vanish); the host's
        # own directories refuse the write.
        assert f"refused {targets[0]}" in result.stdout and f"refused {targets[4]}" in result.stdout
    finally:
        for path in targets:
            if os.path.exists(path):
                os.remove(path)


def test_trainer_environment_is_invisible(host):
    attack = code(f"""
        import os
        print(dict(os.environ))
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        for pid in [{host["pid"]}, os.getppid(), 1] + pids:
            for what in ("environ", "cmdline"):
                try:
                    print(open(f"/proc/{{pid}}/{{what}}", "rb").read())
                except OSError:
                    pass
    """)
    result = run_program(attack, limits=FAST)
    assert result.ok, result.stderr
    assert SECRET not in result.stdout + result.stderr and SECRET_NAME not in result.stdout
    test = f"import os\nassert {SECRET_NAME!r} in os.environ"
    assert run_tests("import os", [test], limits=FAST) == 0.0


def test_killing_the_parent_or_the_trainer_fails(host):
    attack = code(f"""
        import os, signal
        killed = []
        for attempt in (lambda: os.kill(os.getppid(), 9),
                        lambda: os.killpg(os.getpgid(os.getppid()), 9),
                        lambda: os.kill({host["pid"]}, 9), lambda: os.killpg({os.getpgid(0)}, 9)):
            try:
                attempt()
                killed.append(attempt)
            except OSError:
                pass
        try:
            os.kill(-1, signal.SIGKILL)  # everything this uid may signal: only itself, spared
        except OSError:
            pass
    """)
    assert run_tests(attack, ["assert killed"], limits=FAST) == 0.0
    assert os.getpid() == host["pid"]  # still here


def test_stdout_flood_is_cut_off_quickly():
    limits = SandboxLimits(timeout_s=20.0, max_output_bytes=1 << 16)
    start = time.monotonic()
    result = run_program("while True:\n    print('x' * 1000)", limits=limits)
    assert result.output_truncated and not result.ok and not result.timed_out
    assert len(result.stdout) == limits.max_output_bytes
    assert time.monotonic() - start < 10.0
    stderr_flood = "import sys\nsys.stderr.write('e' * (1 << 20))"
    assert run_tests(stderr_flood, ["pass"], limits=limits) == 0.0


def test_no_connection_reaches_a_listening_socket():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    attack = code(f"""
        import socket
        connected = False
        for host in ("127.0.0.1", "localhost", "::1"):
            try:
                socket.create_connection((host, {port}), timeout=1).sendall(b"hello")
                connected = True
            except OSError:
                pass
    """)
    try:
        assert run_tests(attack, ["assert connected"], limits=FAST) == 0.0
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_huge_file_write_is_stopped_by_the_file_size_limit():
    limits = SandboxLimits(timeout_s=5.0, max_file_bytes=1 << 20)
    attack = code("""
        import os
        try:
            with open("big.bin", "wb") as f:
                f.write(b"0" * (100 << 20))
        finally:
            print(os.path.getsize("big.bin"))
    """)
    result = run_test(attack, "assert os.path.getsize('big.bin') == 100 << 20", limits=limits)
    assert not result.ok and "File too large" in result.stderr  # Python ignores SIGXFSZ: EFBIG
    assert int(result.stdout) <= limits.max_file_bytes


def test_too_many_open_files_fail():
    attack = "files = []\nwhile len(files) < 1000:\n    files.append(open('/dev/null'))\n"
    result = run_test(attack, "assert len(files) == 1000", limits=FAST)
    assert not result.ok and "Too many open files" in result.stderr


@pytest.mark.parametrize("parent", ["exits", "hangs"])
def test_detached_grandchild_is_killed_with_the_run(parent):
    name = "%d.%06d" % (900 + secrets.randbelow(99), secrets.randbelow(10 ** 6))
    attack = code(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{name}"])
            os._exit(0)
        time.sleep(0.3)
        {"time.sleep(60)" if parent == "hangs" else "pass"}
    """)
    limits = SandboxLimits(timeout_s=1.5)
    start = time.monotonic()
    result = run_program(attack, limits=limits)
    assert result.timed_out == (parent == "hangs")
    assert time.monotonic() - start < limits.timeout_s + 3.0
    assert_none_left(name)


def test_forged_success_markers_earn_nothing():
    wrong = "def f(x):\n    return 0\n"
    forgeries = [
        wrong + "print('PASSED')\nprint('ok')\nimport os\nos._exit(0)\n",
        wrong + "import sys\nsys.exit(0)\n",
        wrong + "raise SystemExit\n",
        # hunting for the marker in every place a careless harness would put it
        wrong + code("""
            import os, sys
            for path in ("/proc/self/cmdline", "/proc/self/environ", "/dev/stdin",
                         "/proc/1/cmdline"):
                try:
                    print(open(path, "rb").read())
                except OSError:
                    pass
            print(sys.argv, sys.stdin.read(), os.listdir("."))
            sys.stdout.flush()
            os._exit(0)
        """),
        wrong + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    ]
    assert run_many([(p, ["assert f(1) == 1"]) for p in forgeries], limits=FAST,
                    max_workers=2) == [0.0] * len(forgeries)


def test_fallback_without_namespaces_is_refused_unless_unsafe_is_allowed():
    before = sandbox.metrics()
    with pytest.raises(RuntimeError, match="allow_unsafe"):
        run_program("print(1)", limits=SandboxLimits(timeout_s=2.0, namespaces=False))
    limits = SandboxLimits(timeout_s=2.0, namespaces=False, allow_unsafe=True)
    probe = run_program("print(1)", limits=limits)
    assert {"audit-hook", "unsafe"} <= set(probe.isolation.split(",")) and probe.ok
    assert sandbox.metrics()["sandbox/unsafe_runs"] == before["sandbox/unsafe_runs"] + 1
    result = run_program("import os\nos.system('echo escaped')", limits=limits)
    assert not result.ok and "is not allowed" in result.stderr and "escaped" not in result.stdout
    # (subprocess itself may not even import: the run's uid cannot read a stdlib under /root)
    result = run_program("import subprocess\nsubprocess.run(['echo', 'escaped'])", limits=limits)
    assert not result.ok and "escaped" not in result.stdout
    if "uid" not in probe.isolation:
        return
    # As root the uid sweep stands in for the PID namespace: a setsid'd escapee that would keep
    # touching a heartbeat file must be dead once the run returns.
    heartbeat = f"/tmp/r1jax-heartbeat-{secrets.token_hex(6)}"
    attack = code(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            while True:
                open({heartbeat!r}, "w").close()
                time.sleep(0.05)
        time.sleep(0.3)
    """)
    start = time.monotonic()
    result = run_program(attack, limits=limits)
    try:
        assert result.ok and time.monotonic() - start < limits.timeout_s + 3.0
        assert os.path.exists(heartbeat)  # the escapee did run ...
        os.remove(heartbeat)
        time.sleep(0.5)
        assert not os.path.exists(heartbeat)  # ... and is gone
    finally:
        if os.path.exists(heartbeat):
            os.remove(heartbeat)


def runnable_by_nobody(interpreter: str) -> bool:
    """Whether user `nobody` may run `interpreter` and read the sandbox module with it."""
    try:
        return subprocess.run([interpreter, "-c", f"open({sandbox.__file__!r}).read()"], user=65534,
                              capture_output=True, timeout=30, cwd="/").returncode == 0
    except OSError:
        return False


ROOTLESS_ATTACK = code("""
    import os, socket
    try:
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    except OSError as e:
        print("net refused:", e)
    for action in (lambda: open(TARGET, "w").write("pwned"), lambda: os.remove(TARGET)):
        try:
            action()
        except OSError as e:
            print("fs refused:", e)
""")


def test_rootless_harness_gets_namespaces_or_the_audit_hook():
    """As root we also run the harness as `nobody`, covering the user-namespace path (which must
    protect nobody's own files) and the unsafe fallback (which still refuses sockets). Without a
    syscall filter binding for that interpreter (and no cgroup for nobody), the namespaced run is
    refused by default too. nobody's interpreter can read its standard library, so here the issue's
    fallback escape (_posixsubprocess.fork_exec of bash, then /dev/tcp to 127.0.0.1) really runs:
    with the filter, bash starts and its connection is refused."""
    if os.geteuid() != 0:
        pytest.skip("this run already is the rootless path")
    interpreter = next((p for p in (sys.executable, "/usr/bin/python3")
                        if os.path.exists(p) and runnable_by_nobody(p)), None)
    if interpreter is None:
        pytest.skip("no interpreter that the nobody user may run on this repository")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    # The fallback escape: exec bash past the audit hook, then /dev/tcp to the host.
    exec_attack = corpus.fill(corpus.FALLBACK["fork_exec_sh_dev_tcp"], {"PORT": listener.getsockname()[1]})
    package = os.path.dirname(sandbox.__file__)
    probe = code(f"""
        import importlib.util, os, sys, tempfile
        spec = importlib.util.spec_from_file_location("sandbox", {package + "/__init__.py"!r},
                                                      submodule_search_locations=[{package!r}])
        sandbox = importlib.util.module_from_spec(spec)
        sys.modules["sandbox"] = sandbox
        spec.loader.exec_module(sandbox)
        fd, target = tempfile.mkstemp(prefix="r1jax-nobody-")
        os.write(fd, b"alive")
        os.close(fd)
        attack = {ROOTLESS_ATTACK!r}.replace("TARGET", repr(target))
        try:
            sandbox.run_program("pass")
            print(repr("ran by default"))
        except RuntimeError as e:
            print(repr(str(e).splitlines()[0]))
        for namespaces in (True, False):
            limits = sandbox.SandboxLimits(namespaces=namespaces, allow_unsafe=True)
            result = sandbox.run_program(attack, limits=limits)
            intact = os.path.exists(target) and open(target).read() == "alive"
            print(repr((result.isolation, result.stdout, intact)))
        if os.path.exists(target):
            os.remove(target)
        limits = sandbox.SandboxLimits(namespaces=False, allow_unsafe=True)
        result = sandbox.run_program({exec_attack!r}, limits=limits)
        print(repr((result.isolation, result.stdout)))
    """)
    done = subprocess.run([interpreter, "-c", probe], user=65534, group=65534, extra_groups=[],
                          capture_output=True, text=True, timeout=60, cwd="/")
    try:
        reached = listener.accept() is not None
    except BlockingIOError:
        reached = False
    listener.close()
    assert done.returncode == 0, done.stderr
    by_default, with_namespaces, without, (exec_isolation, exec_out) = map(eval, done.stdout.splitlines())
    if "seccomp" in exec_isolation:  # the filter holds without namespaces: no socket, even after exec
        assert "SPAWNED" in exec_out and not reached, exec_out
    (ns_isolation, ns_out, ns_intact), (fb_isolation, fb_out, _) = with_namespaces, without
    ns_features = set(ns_isolation.split(","))
    assert {"netns", "pidns", "mntns", "minroot", "keyring"} <= ns_features and "uid" not in ns_features
    assert ("seccomp" in ns_features) == (by_default == "ran by default")
    assert "net refused" in ns_out and ns_intact
    assert {"audit-hook", "unsafe"} <= set(fb_isolation.split(","))
    assert "net refused: sandbox: socket." in fb_out


def test_the_sandbox_benchmark_runs_both_sides(tmp_path):
    from r1jax.bench import sandbox as bench

    old = tmp_path / "old_sandbox.py"  # a second implementation: a copy of this one's host module
    source = pathlib.Path(sandbox.__file__).read_text().replace("from . import", "from r1jax.rl.sandbox import")
    old.write_text(source.replace('os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")',
                                  repr(sandbox._CHILD_SCRIPT)))
    rows = bench.main(["--programs", "2", "--runs", "1", "--workers", "2", "--baseline", str(old),
                       "--out", str(tmp_path / "out.jsonl")])
    assert [r["sandbox"] for r in rows] == ["this tree", "baseline"]
    assert all(r["same_shares"] and 0 < r["mean_share"] < 1 and r["ms_per_run"] > 0 for r in rows)


def test_host_is_intact_after_the_hostile_programs(host):
    assert host["canary"].read_text() == "alive"
    assert os.environ[SECRET_NAME] == SECRET
    assert os.getpid() == host["pid"]
