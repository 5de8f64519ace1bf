"""Every command in README.md, launch/README.md and docs/*.md is true as written.

A command is a line of a fenced code block that starts with `python -m r1jax...` or `python launch/...`
(optionally after `nice -n N`; `\\` continues it on the next line; `# ...` ends it). Lines with `<...>` or
`[--...]` are synopses, not commands, and are left out. For each command:
* the module or script exists and its `--help` runs; every `--flag` it uses is one its help lists;
* `--config FILE[:preset]` names a file in the repository whose get_config accepts the preset, and every
  `--config.a.b=v` names a field of that config; `--mesh_preset` a preset of configs/mesh_presets.py;
  `--topology` a slice r1jax.aot understands; `r1jax.models.count NAME` a model preset;
and the cheap ones run: every `launch/tpu.py` command as a dry run, `r1jax.models.count` with its documented
output. (The costly ones -- training runs, benchmarks, AOT compiles -- are exercised by their own tests.)
"""

import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env

DOCS = ["README.md", "launch/README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
START = re.compile(r"(?:nice -n \d+ )?(python (?:-m r1jax\S*|launch/\S+).*)")


def doc_commands():
    """[(file:line, argv after `python`, the text after the command's `#` on its last line)]."""
    found = []
    for doc in DOCS:
        fence, text, comment = False, None, ""
        for number, line in enumerate(open(os.path.join(REPO, doc)).read().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                fence = not fence
                continue
            if not fence:
                continue
            if text is None:
                match = START.match(stripped)
                if not match:
                    continue
                text, where = match.group(1), f"{doc}:{number}"
            else:
                text += " " + stripped
            code, _, comment = text.partition(" #")
            if code.rstrip().endswith("\\"):
                text = code.rstrip()[:-1].rstrip()
                continue
            if not re.search(r"<\w+>|\[--", code):
                found.append((where, shlex.split(code)[1:], comment.strip()))
            text = None
    return found


COMMANDS = doc_commands()


def _program(argv) -> tuple[str, ...]:
    """What runs: ('-m', module) or (script, subcommand)."""
    return ("-m", argv[1]) if argv[0] == "-m" else (argv[0], argv[1])


def _parts(argv) -> list[tuple[tuple[str, ...], list[str]]]:
    """(program, its arguments) pairs: what follows `--` in a launcher's command is r1jax.main's."""
    if "--" not in argv:
        return [(_program(argv), argv)]
    cut = argv.index("--")
    return [(_program(argv), argv[:cut]), (("-m", "r1jax.main"), argv[cut + 1:])]


def _flags(argv) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--") and not a.startswith("--config.") and a != "--"]


def _value(argv, flag):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_the_docs_have_commands():
    programs = {_program(argv) for _, argv, _ in COMMANDS}
    assert ("-m", "r1jax.main") in programs and ("-m", "r1jax.aot") in programs
    assert ("launch/tpu.py", "run") in programs
    assert any(argv == ["-m", "r1jax.aot", "--config", "configs/sft.py", "--topology", "v5p-512"]
               for where, argv, _ in COMMANDS if where.startswith("README.md")), "README's AOT command moved"


@pytest.fixture(scope="module")
def helps():
    """Each program's --help text (started together, waited for together)."""
    procs = {}
    for program in sorted({program for _, argv, _ in COMMANDS for program, _ in _parts(argv)}):
        procs[program] = subprocess.Popen([sys.executable, *program, "--help"], cwd=REPO, env=subprocess_env(),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {}
    for program, proc in procs.items():
        text, _ = proc.communicate(timeout=120)
        absl_help = proc.returncode == 1 and "Try --helpfull" in text  # absl's --help exits 1
        assert proc.returncode == 0 or absl_help, f"{' '.join(program)} --help failed:\n{text[-2000:]}"
        out[program] = text
    return out


@pytest.mark.parametrize("where,argv", [(w, a) for w, a, _ in COMMANDS], ids=[w for w, _, _ in COMMANDS])
def test_command_parses(where, argv, helps):
    assert os.path.exists(os.path.join(REPO, argv[0])) if argv[0] != "-m" else \
        importlib.util.find_spec(argv[1]) is not None, f"{where}: {argv[:2]} does not exist"
    for program, args in _parts(argv):
        for flag in _flags(args):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])|--\[no\]{re.escape(flag[2:])}",
                             helps[program]), f"{where}: {' '.join(program)} has no flag {flag}"
    config = _value(argv, "--config")
    if config is not None:
        path, _, preset = config.partition(":")
        assert os.path.isfile(os.path.join(REPO, path)), f"{where}: no config file {path}"
        module = importlib.import_module(os.path.splitext(path)[0].replace("/", "."))
        block = module.get_config(preset or None)
        for override in (a for a in argv if a.startswith("--config.")):
            node = block
            for part in override.split("=", 1)[0][len("--config."):].split("."):
                assert part in node, f"{where}: {path}{':' + preset if preset else ''} has no field {override}"
                node = node[part]
    preset = _value(argv, "--mesh_preset")
    if preset is not None:
        from configs import mesh_presets
        assert preset in mesh_presets.PRESETS, f"{where}: no mesh preset {preset!r}"
    topology = _value(argv, "--topology")
    if topology is not None:
        from r1jax.aot import parse_topology
        parse_topology(topology)
    if program == ("-m", "r1jax.models.count"):
        from r1jax.models import get_preset
        get_preset(argv[2])


TPU = [(w, a) for w, a, _ in COMMANDS if a[0] == "launch/tpu.py"]


def test_tpu_commands_dry_run():
    """Every launch/tpu.py command prints its gcloud commands (--dry-run; the zone as after `gcloud config`)."""
    env = subprocess_env() | {"R1JAX_ZONE": "us-east5-a", "R1JAX_PROJECT": "my-project"}
    procs = [(where, subprocess.Popen([sys.executable, *argv, "--dry-run"], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)) for where, argv in TPU]
    for where, proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "gcloud" in out, f"{where}: {out[-2000:]}"


def test_count_prints_what_the_docs_show():
    """The lines a doc shows after the command (up to the end of its block) are the first lines it prints."""
    for where, argv, _ in COMMANDS:
        if argv[:2] == ["-m", "r1jax.models.count"]:
            out = subprocess.run([sys.executable, *argv], cwd=REPO, env=subprocess_env(), capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0, out.stderr[-2000:]
            doc, line = where.split(":")
            after = open(os.path.join(REPO, doc)).read().splitlines()[int(line):]
            shown = [l.lstrip("# ").strip() for l in after[:next(i for i, l in enumerate(after) if "```" in l)]]
            printed = out.stdout.strip().splitlines()[:len(shown)]
            assert shown and shown == printed, f"{where}: the docs show {shown}, the command prints {printed}"


def _imported_distributions(paths, exclude=()) -> set[str]:
    """Distributions (normalised names) of every third-party module imported by the .py files under `paths`
    (not under `exclude`)."""
    import ast
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    names = set()
    for path in paths:
        for file in glob.glob(os.path.join(REPO, path, "**", "*.py"), recursive=True):
            if any(file.startswith(os.path.join(REPO, x) + os.sep) for x in exclude):
                continue
            for node in ast.walk(ast.parse(open(file).read(), file)):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names.add(node.module.split(".")[0])
    local = {"r1jax", "configs", "launch", "_wire"}  # _wire: the sandbox child imports its sibling by file
    local |= {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, "tests", "*.py"))}  # test helpers
    third_party = sorted(n for n in names - local - set(sys.stdlib_module_names))
    unknown = [n for n in third_party if n not in owners]
    assert not unknown, f"imported but not installed: {unknown}"
    return {_normal(owners[n][0]) for n in third_party}


def _normal(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=\[;]", requirement)[0].strip()).lower()


def test_setup_declares_exactly_what_is_imported():
    text = open(os.path.join(REPO, "setup.py")).read()
    section = lambda name: {_normal(r) for r in re.findall(r'"([^"]+)"', re.search(name + r".*?\]", text, re.S)[0])}
    required, extras = section(r"install_requires=\["), section(r'"test": \[') | section(r'"bench": \[')
    runtime = _imported_distributions(["r1jax", "configs", "launch"], exclude=["r1jax/bench"])
    # array-record: imported by grain for our ArrayRecord source; pyseccomp: imported by name (importlib) by the
    # sandbox's filter, after libseccomp's own `seccomp` binding
    indirect = {"array-record", "pyseccomp"}
    assert required - indirect == runtime, (
        f"declared but not imported: {sorted(required - runtime - indirect)}; "
        f"imported but not declared: {sorted(runtime - required)}")
    others = _imported_distributions(["tests", "r1jax/bench"]) - required
    assert others <= extras, f"tests / benchmarks import undeclared {sorted(others - extras)}"


def test_citations_point_into_the_repository():
    """The facts the code follows live in docs/reference.md: every `docs/reference.md §N` names one of its sections,
    and no file cites a reference outside the repository."""
    sections = set(re.findall(r"^## (\d+)\.", open(os.path.join(REPO, "docs", "reference.md")).read(), re.M))
    files = [f for pattern in ("r1jax/**/*.py", "configs/*.py", "tests/*.py", "launch/*", "docs/*.md", "*.md")
             for f in glob.glob(os.path.join(REPO, pattern), recursive=True)]
    cited, outside = set(), []
    for file in files:
        text = open(file).read()
        cited |= set(re.findall(r"docs/reference\.md §(\d+)", text))
        if "REFERENCE" + ".md" in text:
            outside.append(os.path.relpath(file, REPO))
    assert not outside, f"cite docs/reference.md instead: {outside}"
    assert cited and cited <= sections, f"cited sections missing from docs/reference.md: {sorted(cited - sections)}"
