"""The README and docs/ cannot drift from the code.

Every repository path they name exists (links, their #anchors, and paths in text and code);
every ``gpu-cost-agent`` command line in them parses with the real argument parser (a command
in a shell block whole, an inline mention by its subcommand and flags); every ``gpucost_*``
metric name is one the agent exports (scraped from a real replay with running costs, cloud
prices and a demand charge) or one a recording rule defines; every key of
docs/configuration.md is a real setting with its real environment variable, and every setting
is there; the README stays a short guide whose configuration example is accepted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from agentproc import ROOT, AgentProcess

README = ROOT / "README.md"
DOCS = [README, ROOT / "grafana" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_REFERENCE = ROOT / "docs" / "configuration.md"
README_MAX_BYTES = 12 * 1024

_FENCE = re.compile(r"^[ \t]*(```|~~~)(\w*)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
_INLINE = re.compile(r"`((?:[^`\n]|\n(?!\s*\n))+)`")  # a code span may wrap, never across a blank line
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
#: A path from the repository's root (not one inside a URL, an absolute path or an image name).
_PATH = re.compile(r"(?<![\w./~:-])((?:agent|benchmarks|deploy|docs|fixtures|grafana|tests)/[\w.*/-]*[\w*/]"
                   r"|Dockerfile\b|pyproject\.toml\b)")
_COMMAND = re.compile(r"(?<![\w/.=-])(?:\S*/)?gpu-cost-agent(?=\s|$)(.*)")
_METRIC = re.compile(r"(?<![\w:])(?:[a-z_]+:)?gpucost[_:][A-Za-z0-9_:]*")
_ENV = re.compile(r"(?<![\w])GPUCOST_[A-Z0-9_]*")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _fences(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(2), m.group(3)) for m in _FENCE.finditer(text)]


def _prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return _FENCE.sub("", text)


# -- paths and links --------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(_text(path)).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def named_paths(doc: Path) -> list[str]:
    """Repository paths a page names in its text and code, and links that point into the repository."""
    text = _text(doc)
    out = []
    for m in _PATH.finditer(text):
        if re.match(r":\d", text[m.end():m.end() + 2]):
            continue  # an image's tag (grafana/grafana:10.4.0), not a file
        out.append(m.group(1).rstrip("."))
    return out


def broken_paths(doc: Path, base: Path | None = None) -> list[str]:
    """What a page names that is not there; its links are relative to ``base`` (its folder)."""
    base = base or doc.parent
    broken = []
    for name in named_paths(doc):
        hits = list(ROOT.glob(name.rstrip("/"))) if "*" in name else [ROOT / name]
        if not hits or not all(h.exists() for h in hits):
            broken.append(f"{_rel(doc)}: {name} does not exist")
    for m in _LINK.finditer(_prose(doc.read_text(encoding="utf-8"))):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        path = (base / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{_rel(doc)}: link {target}: {file_part} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{_rel(doc)}: link {target}: no heading #{anchor} in {_rel(path)}")
    return broken


def test_every_named_path_and_link_exists():
    broken = [line for doc in DOCS for line in broken_paths(doc)]
    assert broken == []


def test_the_path_check_sees_paths_links_and_anchors(tmp_path):
    doc = tmp_path / "probe.md"
    doc.write_text("See `deploy/config.nope.toml`, [cost](cost.md#nope), [x](nope.md) and "
                   "deploy/prometheus/rules/*.yml and [ok](cost.md#whose-cost-it-is-fully-loaded).\n")
    assert sorted(broken_paths(doc, base=ROOT / "docs")) == sorted([
        "probe.md: deploy/config.nope.toml does not exist",
        "probe.md: link cost.md#nope: no heading #nope in docs/cost.md",
        "probe.md: link nope.md: nope.md does not exist",
    ])


# -- command lines ----------------------------------------------------------------------------


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The agent's parser and its subcommands' (``report``'s own parser for ``report``)."""
    from agent.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = dict(sub.choices)
    try:
        from agent.report.cli import build_parser as report_parser
    except ImportError:  # pragma: no cover - report not there
        pass
    else:
        commands["report"] = report_parser()
    return parser, commands


def _parses(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """None when ``args`` parse, else argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


def command_lines(doc: Path) -> list[tuple[str, bool]]:
    """(arguments after ``gpu-cost-agent``, whole) for every command line in a page's code:
    whole for a line of a shell block (it must parse as written), not whole for an inline
    mention (its subcommand and flags must exist)."""
    text = _text(doc)
    out = []
    for lang, body in _fences(text):
        if lang not in ("", "sh", "bash", "console", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                m = _COMMAND.match(part)
                if m:
                    out.append((m.group(1).strip(), True))
    for m in _INLINE.finditer(_prose(text)):
        c = _COMMAND.search(" ".join(m.group(1).split()))
        if c:
            out.append((re.split(r"\s*(?:&&|\||;)\s*", c.group(1))[0].strip(), False))
    return out


def bad_commands(doc: Path) -> list[str]:
    parser, commands = _parsers()
    bad = []
    for rest, whole in command_lines(doc):
        try:
            args = shlex.split(rest, comments=True)
        except ValueError as exc:
            bad.append(f"{_rel(doc)}: gpu-cost-agent {rest}: {exc}")
            continue
        if not args or args[0].startswith("-"):
            problem = _parses(parser, args) if whole else None
            if not whole:
                problem = next((f"unknown option {a}" for a in args if a.startswith("--") and a.split("=")[0]
                                not in parser._option_string_actions), None)
        elif args[0] not in commands:
            problem = f"no command {args[0]!r}"
        elif whole:
            problem = _parses(commands[args[0]], args[1:])
        else:
            known = commands[args[0]]._option_string_actions
            problem = next((f"{args[0]} has no option {a}" for a in args[1:]
                            if a.startswith("-") and len(a) > 1 and a.split("=")[0] not in known), None)
        if problem:
            bad.append(f"{_rel(doc)}: gpu-cost-agent {rest}: {problem}")
    return bad


def test_every_command_line_parses():
    lines = [line for doc in DOCS for line in command_lines(doc)]
    assert len(lines) > 30 and any(whole for _, whole in lines)
    bad = [line for doc in DOCS for line in bad_commands(doc)]
    assert bad == []


def test_the_command_check_refuses_what_argparse_refuses(tmp_path):
    doc = tmp_path / "probe.md"
    doc.write_text("Run `gpu-cost-agent demo --sped 2` or `gpu-cost-agent serve`, or\n\n```sh\n"
                   ".venv/bin/gpu-cost-agent check-config\n.venv/bin/gpu-cost-agent check-config x.toml --demo\n```\n")
    bad = bad_commands(doc)
    assert len(bad) == 3, bad
    assert any("demo has no option --sped" in b for b in bad) and any("no command 'serve'" in b for b in bad), bad
    assert any("check-config: error: the following arguments are required: FILE" in b for b in bad), bad


#: Flags of other programs that the docs name on their own.
OTHER_FLAGS = {"--query.replica-label": "Thanos Query", "--override-file": "the FinOps FOCUS validator"}


def known_flags() -> set[str]:
    """Every option of the agent's commands, of ``report`` and of the benchmark scripts."""
    parser, commands = _parsers()
    flags = set(parser._option_string_actions)
    for p in commands.values():
        flags |= set(p._option_string_actions)
    for script in (ROOT / "benchmarks").rglob("*.py"):
        flags |= set(re.findall(r"add_argument\(\s*\"(--[\w.-]+)\"", _text(script)))
    return flags | set(OTHER_FLAGS)


def bad_flags(doc: Path) -> list[str]:
    """Options a page names on their own (`--state-dir DIR`) that no command has."""
    known = known_flags()
    return [f"{_rel(doc)}: {m.group(1)} is no option" for span in _INLINE.finditer(_prose(_text(doc)))
            for m in [re.match(r"(--[\w.-]+)", span.group(1))] if m and m.group(1) not in known]


def test_every_flag_named_on_its_own_exists():
    assert bad_flags(README) == [] and "--state-dir" in _text(README)
    bad = [line for doc in DOCS for line in bad_flags(doc)]
    assert bad == []


# -- metric names -----------------------------------------------------------------------------


#: Families the replay below cannot produce: each needs hardware or live processes. Checked by
#: name in the exporter's source instead.
NEEDS_HARDWARE = {
    "gpucost_node_wall_power_watts": "a BMC reading ([host.ipmi])",
    "gpucost_workload_command_info": "live processes with [attribution] cmdline = true",
}


@pytest.fixture(scope="module")
def exported() -> frozenset[str]:
    """Every family and sample name a real replay of the demo trace exports, priced by the demo's
    configuration (time-of-use tariff, PUE, carbon, hardware, running costs, cloud prices) with a
    demand charge and persisted totals."""
    demo = (ROOT / "agent" / "data" / "demo.toml").read_text()
    assert "[tariff]\n" in demo
    config = demo.replace("[tariff]\n", "[tariff]\ndemand_charge_per_kw_month = 10.0\n", 1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.toml").write_text(config)
        agent = AgentProcess("replay", "agent/data/h100_demo.jsonl.gz", "--speed", "50", "--config",
                             str(Path(tmp) / "config.toml"), "--state-dir", str(Path(tmp) / "state"))
        try:
            agent.wait_ready()
            agent.wait_finished()
            status, text = agent.get("/metrics")
        finally:
            assert agent.stop() == 0, agent.output
    assert status == 200
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    source = "".join(_text(p) for p in (ROOT / "agent").glob("exporter*.py"))
    for name in NEEDS_HARDWARE:
        assert f'"{name}"' in source, name
        names.add(name)
    return frozenset(names)


@lru_cache(maxsize=None)
def recorded() -> frozenset[str]:
    """Every name a recording rule in deploy/prometheus/rules/ defines."""
    names = set()
    for path in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            names.update(r["record"] for r in group.get("rules", []) if "record" in r)
    return frozenset(names)


def named_metrics(doc: Path) -> list[str]:
    text = _text(doc)
    out = []
    for m in _METRIC.finditer(text):
        name = m.group()
        after = text[m.end():m.end() + 1]
        before = text[max(0, m.start() - 1):m.start()]
        if after in "*." and after or before in "*…" and before or name.endswith(("_", ":")):
            continue  # a pattern: gpucost_*_total, …:gpucost_x:sum, gpucost_workload_.+
        out.append(name)
    return out


def unknown_metrics(doc: Path, exported: frozenset[str]) -> list[str]:
    return [f"{_rel(doc)}: {name}" for name in named_metrics(doc)
            if name not in (recorded() if ":" in name else exported)]


def test_every_metric_named_is_exported_or_recorded(exported):
    assert "gpucost_running_cost_total" in exported and "gpucost_cloud_cost_to_date" in exported
    assert "gpucost_demand_charge" in exported and "gpucost_workload_gpu_seconds_total" in exported
    assert "instance_currency:gpucost_cost_per_hour:rate5m" in recorded()
    unknown = [line for doc in DOCS for line in unknown_metrics(doc, exported)]
    assert unknown == []


def test_every_exported_family_is_in_the_metrics_reference(exported):
    named = set(named_metrics(ROOT / "docs" / "metrics.md"))
    families = {n for n in exported if n.startswith("gpucost_") and not n.endswith("_total")}
    missing = sorted(f for f in families if f not in named and f"{f}_total" not in named)
    assert missing == []


# -- configuration keys -----------------------------------------------------------------------


def documented_keys(path: Path = CONFIG_REFERENCE) -> dict[str, str | None]:
    """docs/configuration.md's keys, dotted as in TOML, with the variable each row names (None
    where a row names none): rows of the tables under headings ``[table]`` / ``[[table]]``."""
    table = None
    out: dict[str, str | None] = {}
    for line in _prose(_text(path)).splitlines():
        heading = re.match(r"#{2,3} `\[\[?([a-z_.]+)\]\]?`", line)
        if heading:
            table = heading.group(1)
            continue
        if line.startswith("#"):
            table = None
            continue
        row = re.match(r"\| ((?:`[a-z_]+`(?:, )?)+) \|(.*)", line)
        if table and row:
            env = re.search(r"`(GPUCOST_[A-Z0-9_]+)`", row.group(2))
            for key in re.findall(r"`([a-z_]+)`", row.group(1)):
                out[f"{table}.{key}"] = env.group(1) if env else None
    return out


def config_drift(documented: dict[str, str | None]) -> list[str]:
    from agent.config import setting_keys, setting_tables

    real = setting_keys()
    problems = [f"{key}: not a setting" for key in documented if key not in real]
    problems += [f"{key}: not documented" for key in real if key not in documented]
    problems += [f"{key}: documented with {documented[key]}, the variable is {real[key]}"
                 for key in documented if key in real and documented[key] != real[key]]
    tables = set(re.findall(r"^#{2,3} `\[\[?([a-z_.]+)\]\]?`", _text(CONFIG_REFERENCE), re.M))
    problems += [f"[{t}]: no heading" for t, array in setting_tables().items() if array and t not in tables]
    return problems


def test_every_setting_is_documented_and_every_documented_key_is_a_setting():
    documented = documented_keys()
    assert len(documented) > 60
    assert config_drift(documented) == []


def test_every_environment_variable_named_is_a_setting():
    from agent.config import setting_keys, setting_tables

    known = {v for v in setting_keys().values() if v}
    known |= {"GPUCOST_" + t.upper().replace(".", "__") for t in setting_tables()}
    unknown = []
    for doc in DOCS:
        for line in _text(doc).splitlines():
            if "did you mean" in line or "ignoring environment variable" in line:
                continue  # the example of a misspelt variable
            unknown += [f"{_rel(doc)}: {v}" for v in _ENV.findall(line) if not v.endswith("_") and v not in known]
    assert unknown == []


def test_the_config_check_sees_a_missing_a_false_and_a_misnamed_key():
    documented = documented_keys()
    documented.pop("agent.tick_seconds")
    documented["agent.tick_secs"] = "GPUCOST_AGENT__TICK_SECS"
    documented["gpu.enabled"] = "GPUCOST_GPU__ENABLE"
    assert sorted(config_drift(documented)) == [
        "agent.tick_seconds: not documented",
        "agent.tick_secs: not a setting",
        "gpu.enabled: documented with GPUCOST_GPU__ENABLE, the variable is GPUCOST_GPU__ENABLED",
    ]


# -- the README -------------------------------------------------------------------------------


def test_the_readme_is_a_short_guide_with_the_two_quick_start_commands():
    text = _text(README)
    assert len(text.encode()) <= README_MAX_BYTES
    blocks = [body.strip() for lang, body in _fences(text) if lang == "sh"]
    assert "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/gpu-cost-agent" in blocks
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in blocks
    ci = _text(ROOT / ".ci" / "run")
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in ci


def test_the_readme_configuration_example_is_accepted(tmp_path):
    from agent.cli import validate

    examples = [body for lang, body in _fences(_text(README)) if lang == "toml"]
    assert examples
    for i, body in enumerate(examples):
        path = tmp_path / f"example{i}.toml"
        path.write_text(body)
        checked = validate(str(path), {})
        assert checked.settings.tariff is not None and checked.settings.running_costs
        assert checked.settings.cloud_prices and checked.settings.hardware.gpu_price > 0
