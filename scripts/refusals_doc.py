"""Every message zk0 refuses or fails with, read from the code: docs/reference/refusals.md (scripts/reference_docs.py).

Read from the source, not run: each `raise X("...")`, each problem a check collects (`problems.append`,
`row.problem`, `row.warn`, `parser.error`), each `${VAR:?message}` in compose*.yaml and each `echo "..." >&2` of the
shell scripts. A formatted value shows as <its name>, so the fixed words of a message can be searched for.
"""

from __future__ import annotations

import ast
import html
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "app" / "zk0"
SCRIPTS = ("scripts/*.sh", "supernodes/*.sh", "superlink/*.sh", "docker/*.sh")
# Calls that collect a problem for a refusal listed all at once, and the receivers they are made on.
COLLECTORS = {"append", "problem", "warn", "error"}
RECEIVERS = re.compile(r"(problems|errors|warnings|row|parser|self)$")
# A message a function returns for its caller to raise or list (a reason, a problem): it says what to do.
RETURNED = re.compile(r"ZK0_|cannot|refus|must |not found|does not exist|needs |; (run|set|use|pass|point|give)")
# Where a message is met, by module (first match wins; "" catches the rest).
GROUPS = [
    ("Settings and env-files: every command's preflight (exit 2), the ServerApp and each node at start",
     ("settings.py", "settings_base.py", "settings_names.py", "node_settings.py", "cameras.py", "labs.py",
      "deploy/preflight.py")),
    ("Datasets: `zk0 check`, every command's preflight (exit 2), each node when it opens its dataset",
     ("check.py", "hub.py", "formats.py", "data.py", "stats.py")),
    ("`zk0 local`", ("deploy/local.py", "deploy/run_lock.py", "deploy/node_watch.py", "deploy/procs.py")),
    ("`zk0 supernode` and the fast loop", ("deploy/supernode.py", "deploy/node_loop.py", "deploy/exec_loop.py",
                                           "deploy/fork_executor.py", "deploy/app_forks.py")),
    ("`zk0 submit` and the `flwr` CLI", ("deploy/",)),
    ("The ServerApp during a run (its log; `zk0 local` and `zk0 submit` exit 1)", ("server/",)),
    ("A node during a run (its SuperNode's log; the round record's `excluded`)",
     ("node/", "train.py", "evaluate.py", "model.py", "lora.py", "wire.py", "features.py", "feature_store.py")),
    ("The simulator (`zk0 demo --sim`, `zk0 eval --sim`, `ZK0_SIM_EVAL_EVERY`)", ("sim/",)),
    ("Benchmarks (`zk0 bench`)", ("bench/",)),
    ("The `zk0` command line and the rest of the package", ("",)),
]


def _placeholder(node: ast.expr) -> str:
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args:
        node = node.func.value  # name.upper() -> name
    source = ast.unparse(node)
    if source == "ENV_PREFIX":
        return "ZK0_"
    name = source.rsplit(".", 1)[-1] if re.fullmatch(r"[\w.]+", source) else "value"
    return f"<{name}>"


def template(node: ast.AST) -> str | None:
    """The message a string expression writes, formatted values as <name>; None when it is not a string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else _placeholder(v.value) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template(node.left), template(node.right)
        return left + right if left is not None and right is not None else None
    return None


def _message(node: ast.AST) -> str | None:
    if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
        return template(node.exc.args[0])
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTORS
            and RECEIVERS.search(ast.unparse(node.func.value)) and node.args):
        return template(node.args[0])
    if isinstance(node, ast.Return) and node.value is not None:
        values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        texts = [t for v in values if (t := template(v)) and RETURNED.search(t)]
        return texts[0] if texts else None
    return None


def _worded(text: str) -> bool:
    """Fixed words enough to search for: at least two words outside the <placeholders>."""
    return len(re.findall(r"[A-Za-z]{2,}", re.sub(r"<\w+>", " ", text))) >= 2


def python_messages(path: Path) -> list[str]:
    """The module's messages in source order, each once."""
    found = [(node.lineno, text) for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if (text := _message(node)) and _worded(text)]
    return list(dict.fromkeys(text for _, text in sorted(found)))


def _group(relative: str) -> str:
    return next(title for title, prefixes in GROUPS if any(relative.startswith(p) for p in prefixes))


def _item(text: str, where: str) -> str:
    escaped = html.escape(" ".join(text.split()), quote=False).replace("*", "\\*")
    return f"- {escaped} <small>(`{where}`)</small>"


def other_messages() -> list[str]:
    """Compose's `${VAR:?message}` and the shell scripts' messages to stderr."""
    items = []
    for path in sorted(ROOT.glob("compose*.yaml")):
        items += [_item(f"{name}: {text}", path.name)
                  for name, text in re.findall(r"\$\{(\w+):\?([^}]*)\}", path.read_text())]
    for path in sorted(p for pattern in SCRIPTS for p in ROOT.glob(pattern)):
        lines = path.read_text().splitlines() + [""]
        # A message the script stops with: `exit N` (or its usage text) on the same line or the next.
        found = [m.group(1) or m.group(2) for line, after in zip(lines, lines[1:], strict=False)
                 if (m := re.search(r'echo "([^"]+)" >&2|\bsay "([^"]+)"', line))
                 and re.search(r"\bexit [1-9]|\busage\b", line + after)]
        items += [_item(message, str(path.relative_to(ROOT))) for message in dict.fromkeys(found)]
    return list(dict.fromkeys(items))


def refusals_page(command: str) -> str:
    """The page: a section per group, every message with the file it comes from."""
    groups: dict[str, list[str]] = {title: [] for title, _ in GROUPS}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        groups[_group(relative)] += [_item(text, relative) for text in python_messages(path)]
    lines = [
        "# Every refusal, by where it is met", "",
        f"<!-- GENERATED by `{command}` from the sources under app/zk0, compose*.yaml and the shell scripts. "
        "Do not edit by hand. -->", "",
        "Every message zk0 refuses or fails with, read from its source by `" + command + "`: each `raise`, each "
        "problem a check collects, Compose's required variables and the scripts' errors. A value filled in when "
        "the message is written shows as `<its name>`: search this page for the fixed words of the message you "
        "got. What to do about the common ones: [Troubleshooting](../troubleshooting.md).", "",
    ]
    for title, items in groups.items():
        if items:
            lines += [f"## {title}", "", *items, ""]
    lines += ["## Docker Compose and the scripts", "", *other_messages(), ""]
    return "\n".join(lines)
