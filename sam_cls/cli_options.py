"""The `sam-cls` flags of Config fields, generated from each field's default, help, bounds and choices."""

import dataclasses

import click

from sam_cls.config import FIELDS, bounds_text, flag, kind


class _AsGiven(click.ParamType):
    """Passes the text through; Config coerces and checks it, so a CLI value and a YAML value meet the same
    rules and a bad one ends in the same one-line error naming the option. `name` is what --help shows."""

    def __init__(self, name: str):
        self.name = name

    def convert(self, value, param, ctx):
        return value


class _ShownChoice(click.Choice):
    """--help and shell completion list the choices; Config.validate rejects any other value, in one line."""

    def convert(self, value, param, ctx):
        return value


class _ConfigOption(click.Option):
    """A Config field's flag: parses to None when not given (so a --config file's value or the field's default
    applies), while --help shows the field's real default and its range, as click shows an IntRange's."""

    def __init__(self, *args, shown: str, range_text: str, **kwargs):
        super().__init__(*args, default=None, show_default=False, **kwargs)
        self.extra = "; ".join(part for part in (f"default: {shown}", range_text) if part)

    def get_help_record(self, ctx):
        opts, text = super().get_help_record(ctx)
        return opts, f"{text}  [{self.extra}]"


_METAVARS = {int: "integer", float: "float", str: "text", list: "list"}


def config_options(names=None):
    """Flags for Config fields (all of them unless named), generated from the fields' defaults and metadata."""

    def decorate(fn):
        for name in reversed(names or list(FIELDS)):
            field, meta = FIELDS[name], FIELDS[name].metadata
            value_type, _ = kind(name)
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            if meta["shown"] is not None:
                shown = meta["shown"]
            elif value_type is bool:
                shown = flag(name) if default else f"no-{flag(name)}"  # as click shows a bool flag's default
            elif value_type is list:
                shown = ",".join(map(str, default))
            else:
                shown = str(default)
            kwargs = {"cls": _ConfigOption, "help": meta["help"], "shown": shown,
                      "range_text": bounds_text(meta, brief=True)}
            if value_type is bool:
                decls = [f"--{flag(name)}/--no-{flag(name)}", name]
            else:
                decls = [f"--{flag(name)}", name]
                kwargs["type"] = _ShownChoice(meta["choices"]) if meta["choices"] else _AsGiven(_METAVARS[value_type])
                if meta["metavar"]:
                    kwargs["metavar"] = meta["metavar"]
            fn = click.option(*decls, **kwargs)(fn)
        return fn

    return decorate
