"""'Did you mean' for configuration errors: jsonargparse names the bad key, we add the valid choices."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

from lightning.pytorch.cli import LightningArgumentParser


def _all_keys(parser) -> list[str]:
    """Every option a parser (and its subcommand parsers) accepts, dotted."""
    keys = [a.dest for a in parser._actions if a.dest and a.dest != "help"]
    sub = getattr(parser, "_subcommands_action", None)
    for subparser in sub._name_parser_map.values() if sub else []:
        keys += _all_keys(subparser)
    return keys


def _subclasses(base: type) -> list[type]:
    out = []
    for cls in base.__subclasses__():
        out += [cls, *_subclasses(cls)]
    return out


def _resolve(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _suggest(problem: str, given: str, options: list[str], label: str) -> str:
    close = difflib.get_close_matches(given, options, n=3)
    return problem + (f"; did you mean {' or '.join(close)}?" if close else ".") + f" {label}: {', '.join(options)}"


def config_hint(message: str, parser) -> str:
    """Suggestions for the unknown keys, arguments and class names that ``message`` complains about."""
    lines, keys = [], _all_keys(parser)
    unknown = re.findall(r"does not accept option '([\w.]+)'", message)
    for args in re.findall(r"unrecognized arguments: (.*)", message):
        unknown += [k for k in re.findall(r"--([\w.]+)", args) if k not in {*keys, "config"}]
    for key in unknown:
        parent, _, leaf = key.rpartition(".")
        siblings = sorted({k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent})
        lines.append(_suggest(f"unknown key {key!r}", leaf, siblings, "valid keys here"))
    refused = re.findall(r"class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message)
    # (a callable's argument, e.g. an optimizer's, is reported the other way round)
    refused += [
        (c, o) for o, c in re.findall(r"Option '(\w+)' is not accepted\. Got value: \S+class_path='([\w.]+)'", message)
    ]
    for cls_path, option in refused:
        params = [p for p in inspect.signature(_resolve(cls_path)).parameters if p != "self"]
        if not params:
            lines.append(f"{cls_path} has no argument {option!r}: it takes no arguments.")
            continue
        lines.append(_suggest(f"{cls_path} has no argument {option!r}", option, params, "it takes"))
    typed = r"(?:class_path '([\w.]+)':\s+)?Parser key \"([\w.]+)\":\s+Expected a <class '([\w.]+)'>\. Got value: (.*)"
    for cls_path, key, expected, got in re.findall(typed, message):
        where = f"{key!r} of {cls_path}" if cls_path else repr(key)
        lines.append(f"wrong type for {where}: expected {expected}, got {got.strip()!r}")
    bases = re.findall(r"Subtypes: \[<class '([\w.]+)'>", message)
    for given, base in zip(re.findall(r"dot import path string: (\S+)", message), bases, strict=False):
        names = sorted({c.__name__ for c in _subclasses(_resolve(base)) if not inspect.isabstract(c)})
        lines.append(_suggest(f"no {base.rpartition('.')[2]} is called {given!r}", given, names, "known"))
    return "\n".join(lines)


class HintingParser(LightningArgumentParser):
    """LightningCLI's parser, with 'did you mean' and the valid choices added to its errors."""

    def error(self, message: str, ex: Exception | None = None):
        hint = config_hint(message, self)
        return super().error(f"{message}\n{hint}" if hint else message, ex)


def refused_value_hint(message: str, config) -> str:
    """Names the config key of the class whose constructor refused a value (a ValueError at instantiation)."""
    given = re.findall(r"Given value: Namespace\(class_path='([\w.]+)'", message)
    if not given:
        return ""
    keys = [k.removesuffix(".class_path") for k, v in config.items() if k.endswith("class_path") and v == given[0]]
    reasons = re.findall(r"^\s*- (?!Expected a <class 'NoneType'>)(.+)$", message, flags=re.MULTILINE)
    where = " or ".join(keys) or given[0]
    return f"{where} ({given[0]}): {reasons[0] if reasons else 'value refused'}"
