"""README tables generated from the declarations: commands, every metric with its definition, every option.

``python -m diag_cli.docs`` rewrites the blocks of README.md between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->``; ``python -m diag_cli.docs --check`` exits 1 when they are stale (a test runs the
check, so the README cannot drift from the code).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from diagnostics.spec import Analyzer, Param, params_of

README = Path(__file__).resolve().parent.parent / "README.md"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _analyzers() -> list[Analyzer]:
    from diagnostics.analyzers.registry import all_analyzers

    return [a for a in all_analyzers().values() if isinstance(a, Analyzer)]


def commands_table() -> str:
    """One row per command of ``diag`` (generated analyzer commands and hand-written ones), in ``--help`` order."""
    import typer.main

    from diag_cli.main import app

    group = typer.main.get_command(app)
    rows = ["| command | what it does |", "|---|---|"]
    for name in group.list_commands(None):  # type: ignore[arg-type]
        cmd = group.get_command(None, name)  # type: ignore[arg-type]
        if cmd is None or cmd.hidden:
            continue
        args = " ".join((p.metavar or p.name or "").upper() for p in cmd.params if p.param_type_name == "argument")
        text = cmd.short_help or (cmd.help or "").split("\n\n")[0]
        rows.append(f"| `diag {name} {args}` | {_cell(text)} |")
    return "\n".join(rows)


def metrics_table() -> str:
    """One row per (analyzer, metric): the definition, what index/group mean, the reference."""
    rows = ["| metric | analyzer | definition |", "|---|---|---|"]
    for analyzer in _analyzers():
        for m in analyzer.metrics:
            text = m.definition
            if m.index:
                text += f"; index: {m.index}"
            if m.group:
                text += f"; group: {m.group}"
            if m.unit:
                text += f"; unit: {m.unit}"
            if m.reference:
                text += f" ({m.reference})"
            rows.append(f"| `{m.name}` | {analyzer.name} | {_cell(text)} |")
    return "\n".join(rows)


def _option_row(p: Param) -> str:
    flag = p.flag + (f", {p.info.short}" if p.info.short else "")
    flag += "".join(f", {a}" for a in p.info.aliases)
    default = p.default_text() or "—"
    allowed = (
        " | ".join(p.info.choices)
        if p.info.choices
        else (p.range_text() if p.info.min is not None or p.info.max is not None else "")
    )
    return f"| `{flag}` | `{p.name}` | {_cell(default)} | {_cell(allowed)} | {_cell(p.info.help)} |"


def options_tables() -> str:
    """Per analyzer: every option with its flag, diag.toml key, default, allowed values and meaning."""
    from diagnostics.options import BindingOptions

    out = []
    blocks = [("Binding and data (every command; top-level keys of diag.toml)", BindingOptions)]
    blocks += [(f"`diag {a.name}` (`[{a.name}]` in diag.toml)", a.config) for a in _analyzers()]
    for title, cls in blocks:
        out.append(f"<details><summary>{title}</summary>\n")
        out.append("| flag | diag.toml key | default | allowed | meaning |")
        out.append("|---|---|---|---|---|")
        out += [_option_row(p) for p in params_of(cls) if p.info.toml]
        out.append("\n</details>\n")
    return "\n".join(out).rstrip()


BLOCKS = {"commands": commands_table, "metrics": metrics_table, "options": options_tables}


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current content."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(?:.*?\n)?(<!-- /generated:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"README.md lacks the block <!-- generated:{name} --> ... <!-- /generated:{name} -->")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md's generated blocks, or with ``--check`` report whether they are stale."""
    args = sys.argv[1:] if argv is None else argv
    current = README.read_text(encoding="utf-8")
    fresh = render(current)
    if "--check" in args:
        if fresh != current:
            print("README.md is out of date with the declarations: run 'make readme'", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
