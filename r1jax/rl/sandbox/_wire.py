"""Both ends of the test boundary: the untrusted program's server and the trusted evaluator.

The evaluator (trusted, outside the program's reach) runs the test; every name the test takes from
the program becomes a stub whose calls travel as plain data over a pair of pipes to the program's
process, which runs the call and sends back plain data. What crosses, one JSON line each way:

  evaluator -> program  {"op": "get", "name": n}            what the program bound to `n`
                        {"op": "call", "name": n, "args": v, "kwargs": v}
  program -> evaluator  {"set_up": 1} (sent by the harness before any program line runs),
                        {"done": 1} (the program's last line ran), then one reply per request:
                        {"kind": "callable" | "missing" | "module", "name": m} or {"kind": "value",
                        "value": v}; {"value": v} or {"raised": exception type name, "message": s}

v is plain data: None, bool, int, float, str and lists as JSON; tuples, dicts, sets, frozensets,
bytes and complex numbers as one-key objects ({"t": [...]}, {"d": [[k, v], ...]}, {"s": ...},
{"fs": ...}, {"b": hex}, {"c": [re, im]}). The evaluator decodes replies into fresh builtin
objects of exactly those types, so what the test compares is ordinary data: an object whose
`__eq__` always answers True cannot cross. A reply that breaks the protocol (not JSON, an unknown
tag, too long, the program gone) fails the test, whatever the test catches.

What a test may do: call the program's functions with plain-data arguments, compare their results,
use its own imports, helpers and loops (HumanEval's `def check(candidate)` works unchanged), catch
exceptions the program raises (a builtin exception type arrives as itself, any other as
ProgramError). What it may not: pass callables or objects to the program, see mutations the program
makes to its arguments (they are copies), read attributes of the program's objects, or take a
builtin's name from the program (a program that defines `abs` does not change the test's `abs`).
"""

import ast
import builtins
import json
import os
import sys

MAX_DEPTH = 64


class ProtocolError(BaseException):
    """The program broke the wire protocol: the test fails even where it catches Exception."""


class ProgramError(Exception):
    """The program's function raised an exception that is not a builtin type."""


# ---------------------------------------------------------------- plain data


def encode(x, depth: int = 0):
    """Plain data -> JSON-able value (the program's side: subclasses count as their base type)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply to cross the sandbox boundary")
    if x is None or type(x) is bool:
        return x
    if isinstance(x, str):
        return str(x)
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, list):
        return [encode(v, depth + 1) for v in x]
    if isinstance(x, tuple):
        return {"t": [encode(v, depth + 1) for v in x]}
    if isinstance(x, dict):
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if isinstance(x, frozenset):
        return {"fs": [encode(v, depth + 1) for v in x]}
    if isinstance(x, set):
        return {"s": [encode(v, depth + 1) for v in x]}
    if isinstance(x, (bytes, bytearray)):
        return {"b": bytes(x).hex()}
    if isinstance(x, complex):
        return {"c": [x.real, x.imag]}
    raise TypeError(f"a {type(x).__name__} cannot cross the sandbox boundary (plain data only)")


_LEAVES = (type(None), bool, int, float, str)


def decode(v, depth: int = 0):
    """JSON value -> fresh builtin objects of exact types; anything else is a ProtocolError."""
    if depth > MAX_DEPTH:
        raise ProtocolError("reply nested too deeply")
    if type(v) in _LEAVES:
        return v
    if type(v) is list:
        return [decode(x, depth + 1) for x in v]
    if type(v) is not dict or len(v) != 1:
        raise ProtocolError(f"not plain data: {v!r:.80}")
    (tag, body), = v.items()
    try:
        if tag == "t":
            return tuple(decode(x, depth + 1) for x in _list(body))
        if tag == "d":
            return {decode(k, depth + 1): decode(x, depth + 1) for k, x in map(_pair, _list(body))}
        if tag in ("s", "fs"):
            items = (decode(x, depth + 1) for x in _list(body))
            return set(items) if tag == "s" else frozenset(items)
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "c" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
            return complex(*body)
    except (TypeError, ValueError) as e:  # unhashable key, bad hex
        raise ProtocolError(f"not plain data: {e}") from None
    raise ProtocolError(f"not plain data: {v!r:.80}")


def _list(body):
    if type(body) is not list:
        raise ProtocolError(f"expected a list, got {body!r:.80}")
    return body


def _pair(body):
    if type(body) is not list or len(body) != 2:
        raise ProtocolError(f"expected a [key, value] pair, got {body!r:.80}")
    return body


def send(fd: int, message: dict) -> None:
    data = memoryview((json.dumps(message) + "\n").encode())
    while data:
        data = data[os.write(fd, data):]


# ---------------------------------------------------------------- the program's side (untrusted)


def serve(namespace: dict, requests: int, replies: int) -> None:
    """Answers the evaluator's requests from the program's namespace until the pipe closes."""
    with os.fdopen(requests, "rb") as stream:
        for line in stream:
            request = json.loads(line)
            try:
                reply = _answer(namespace, request)
                json.dumps(reply)  # a non-plain result fails here, inside the try
            except Exception as e:  # noqa: BLE001 - every failure is the program's answer
                reply = {"raised": type(e).__name__, "message": str(e)[:1000]}
            send(replies, reply)


def _answer(namespace: dict, request: dict) -> dict:
    name = request["name"]
    if request["op"] == "get":
        if name not in namespace:
            return {"kind": "missing"}
        value = namespace[name]
        if type(value).__name__ == "module":
            return {"kind": "module", "name": value.__name__}
        if callable(value):
            return {"kind": "callable"}
        return {"kind": "value", "value": encode(value)}
    args = _decode_trusted(request["args"])
    kwargs = _decode_trusted(request["kwargs"])
    return {"value": encode(namespace[name](*args, **kwargs))}


def _decode_trusted(v):
    try:
        return decode(v)
    except ProtocolError as e:
        raise ValueError(str(e)) from None


# ---------------------------------------------------------------- the evaluator's side (trusted)


class Channel:
    """The evaluator's end: requests out, replies in (each reply at most `cap` bytes)."""

    def __init__(self, requests: int, replies: int, cap: int):
        self.requests, self.replies, self.cap, self.pending = requests, replies, cap, b""

    def recv(self) -> dict:
        while b"\n" not in self.pending:
            if len(self.pending) > self.cap:
                raise ProtocolError(f"reply longer than {self.cap} bytes")
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                raise ProtocolError("the program ended")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"reply is not JSON: {e}") from None
        if type(message) is not dict:
            raise ProtocolError(f"reply is not an object: {message!r:.80}")
        return message

    def expect(self, key: str) -> None:
        message = self.recv()
        if message != {key: 1}:
            raise ProtocolError(f"expected {key}, got {message!r:.80}")

    def request(self, message: dict) -> dict:
        try:
            send(self.requests, message)
        except OSError as e:
            raise ProtocolError(f"the program ended ({e})") from None
        return self.recv()


def run_test(channel: Channel, test: str) -> None:
    """Runs `test` against the program behind `channel`; raises when the test fails."""
    code = compile(test, "<test>", "exec")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for name in free_names(ast.parse(test)):
        reply = channel.request({"op": "get", "name": name})
        kind = reply.get("kind")
        if kind == "callable":
            namespace[name] = _stub(channel, name)
        elif kind == "value" and len(reply) == 2:
            namespace[name] = decode(reply["value"])
        elif kind == "module" and reply.get("name") == name and name in sys.stdlib_module_names:
            namespace[name] = __import__(name)
        elif kind not in ("missing", "module") and "raised" not in reply:
            raise ProtocolError(f"bad reply to get {name}: {reply!r:.80}")
    exec(code, namespace)  # noqa: S102 - the test is trusted; the program is behind the stubs


def free_names(tree: ast.AST) -> list[str]:
    """Names the test reads but never binds anywhere, builtins excepted: the program's to supply."""
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return sorted(loaded - bound - set(dir(builtins)))


def _stub(channel: Channel, name: str):
    def call(*args, **kwargs):
        reply = channel.request({"op": "call", "name": name, "args": encode(list(args)),
                                 "kwargs": encode(kwargs)})
        if "value" in reply and len(reply) == 1:
            return decode(reply["value"])
        raised, message = reply.get("raised"), reply.get("message")
        if type(raised) is not str or type(message) is not str or len(reply) != 2:
            raise ProtocolError(f"bad reply to a call of {name}: {reply!r:.80}")
        kind = getattr(builtins, raised, None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            raise kind(message)
        raise ProgramError(f"{raised}: {message}")

    call.__name__ = call.__qualname__ = name
    return call
