"""The command-line convention every entry point shares (train.py, eval.py, `python -m` aot,
train.features, predict, convert, data.build, metrics):

* argparse, long options spelled with hyphens (`--data-dir`, `--batch-size`); the underscore
  spelling of a multi-word option is accepted too (`--batch_size`, `--coordinator_address=H:P`),
  and absl's `--noflag` for a `--flag/--no-flag` boolean. `--help` exits 0; a usage error is
  one line `PROG: error: ...` and exit status 2.
* a run config: `--config configs/NAME.py[:ARG]` plus any number of `--config.KEY=VALUE`
  overrides, parsed by ml_collections' config_flags (the value parsed as the entry's type); an
  unknown key, a bad value or a config file that fails to load is a usage error.
* bad input found past the parser (a missing file, a wrong checkpoint, an unknown preset):
  `report_errors` with the entry point's tuple of user-error types (the classes live in the
  modules that raise them) prints one line `PROG: error: ...`, exit status 2; `--verbose`
  (`add_verbose_argument`) or BLIP2_JAX_TRACEBACK=1 shows the traceback too, and any other
  exception (a bug) keeps it.
* the jax.distributed flags (`--coordinator-address HOST:PORT --num-processes N --process-id I`,
  or `--distributed` for the platform's own detection), and `setup` (logging, jax.distributed).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Callable, Optional, Sequence

import jax
from absl import flags, logging as absl_logging
from ml_collections.config_flags import config_flags, config_path

# `--config.KEY[=VALUE]` / absl's `--noconfig.KEY` (a boolean entry set False).
_OVERRIDE = re.compile(r"^--?(no)?config\.")


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with the package's convention (module docstring).

    config=True: a required `--config FILE[:ARG]`; `--config.KEY=VALUE` overrides are taken out
    of the arguments before argparse sees them, and the parsed namespace holds `config` (the
    ConfigDict, overrides applied, locked when lock_config), `config_file` (FILE[:ARG] as
    given) and `config_overrides` (the override arguments). config="optional": `--config` may
    be left out, then `config` and `config_file` are None and the entry point applies
    `config_overrides` to a config of its own (`apply_overrides`). distributed=True: the
    jax.distributed flags (`add_distributed_arguments`).
    Subcommand parsers (add_subparsers) are of this class too, with neither."""

    def __init__(self, *args, config: bool = False, lock_config: bool = True,
                 distributed: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._config = config
        self._lock_config = lock_config
        if config:
            self.add_argument(
                "--config", required=config != "optional", metavar="FILE[:ARG]",
                help="a run config, configs/NAME.py[:ARG] (its get_config(ARG)); then any number "
                     "of --config.KEY=VALUE overrides (e.g. --config.optimizer.lr=1e-4; VALUE "
                     "is parsed as the entry's type, a KEY the config lacks is an error)")
        if distributed:
            add_distributed_arguments(self)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        overrides: list[str] = []
        if self._config:
            args, overrides = split_overrides(args)
        namespace, extra = super().parse_known_args(hyphenate(self, args), namespace)
        if self._config:
            namespace.config_file = namespace.config
            namespace.config_overrides = overrides
            if namespace.config_file is not None:
                try:
                    namespace.config = load_config(namespace.config_file, overrides,
                                                   lock_config=self._lock_config, prog=self.prog)
                except ConfigArgumentError as e:
                    self.error(str(e))
        return namespace, extra

    def error(self, message: str):
        """One line on stderr, exit status 2 (argparse's own usage lines left out)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


class ConfigArgumentError(ValueError):
    """`--config` or a `--config.KEY=VALUE` override is wrong (unknown key, bad value, a config
    file that does not load)."""


def hyphenate(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """`--foo_bar[=v]` → `--foo-bar[=v]`, and absl's `--nofoo` → `--no-foo`, for the options
    `parser` knows by the hyphenated name only; everything else (values, `--config.x_y=...`
    overrides, whatever follows `--`) unchanged."""
    known = parser._option_string_actions      # argparse's option string → action map
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            out.extend(args[i:])
            break
        if arg.startswith("--") and not _OVERRIDE.match(arg):
            name, eq, value = arg.partition("=")
            if name not in known:
                candidates = [name.replace("_", "-")]
                if name.startswith("--no") and not name.startswith("--no-"):
                    candidates.append("--no-" + candidates[0][4:])
                for c in candidates:
                    if c in known:
                        arg = c + eq + value
                        break
        out.append(arg)
    return out


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the arguments for argparse, the `--config.KEY=VALUE` overrides): an override without
    `=` takes the next argument as its value unless that starts with `--`."""
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if _OVERRIDE.match(arg):
            if ("=" not in arg and not arg.lstrip("-").startswith("no") and i + 1 < len(args)
                    and not args[i + 1].startswith("--")):
                overrides.append(f"{arg}={args[i + 1]}")
                i += 2
                continue
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_config(spec: str, overrides: Sequence[str] = (), *, lock_config: bool = True,
                prog: str = "blip2_jax"):
    """The ConfigDict of `--config SPEC` with `--config.KEY=VALUE` `overrides` applied, parsed as
    ml_collections' config_flags parses them (on a private absl FlagValues); raises
    ConfigArgumentError with a one-line message."""
    argv = [prog, f"--config={spec}", *overrides]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "a run config", flag_values=values,
                                             lock_config=lock_config, sys_argv=argv)
    try:
        rest = values(argv)
        config = holder.value
        # A config file that failed to load is an object raising OSError on any attribute.
        getattr(config, "_blip2_jax_probe", None)
    except (AttributeError, KeyError, IndexError) as e:      # an override's key is not there
        raise ConfigArgumentError(_unknown_key(spec, overrides, lock_config)
                                  or _one_line(e)) from None
    except OSError as e:                                     # no such config file
        # config_flags lists the paths it tried; the last line is the reason.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise ConfigArgumentError(f"--config {spec}: {reason}") from None
    except (flags.Error, ValueError, TypeError) as e:
        raise ConfigArgumentError(_one_line(e)) from None
    if len(rest) > 1:
        raise ConfigArgumentError(f"unrecognized arguments: {' '.join(rest[1:])}")
    return config


def apply_overrides(config, overrides: Sequence[str] = (), *, lock_config: bool = True,
                    prog: str = "blip2_jax", what: str = "the config"):
    """`config` (a ConfigDict, changed in place) with `--config.KEY=VALUE` `overrides` applied as
    `load_config` applies them to a config file's; raises ConfigArgumentError with a one-line
    message (`what` names the config in it)."""
    argv = [prog, *overrides]
    values = flags.FlagValues()
    try:
        holder = config_flags.DEFINE_config_dict("config", config, flag_values=values,
                                                 lock_config=lock_config, sys_argv=argv)
        rest = values(argv)
        config = holder.value
    except (AttributeError, KeyError, IndexError) as e:      # an override's key is not there
        for arg in overrides:
            key = _OVERRIDE.sub("", arg).partition("=")[0]
            try:
                config_path.get_value(key, config)
            except (AttributeError, KeyError, IndexError, TypeError):
                raise ConfigArgumentError(f"--config.{key}: {what} has no such entry") from None
        raise ConfigArgumentError(_one_line(e)) from None
    except (flags.Error, ValueError, TypeError) as e:
        raise ConfigArgumentError(_one_line(e)) from None
    if len(rest) > 1:
        raise ConfigArgumentError(f"unrecognized arguments: {' '.join(rest[1:])}")
    return config


def _unknown_key(spec: str, overrides: Sequence[str], lock_config: bool) -> Optional[str]:
    """The message naming the first override whose key the config lacks (None: none does, or
    the config alone does not load)."""
    try:
        base = load_config(spec, (), lock_config=lock_config)
    except ConfigArgumentError:
        return None
    for arg in overrides:
        key = _OVERRIDE.sub("", arg).partition("=")[0]
        try:
            config_path.get_value(key, base)
        except (AttributeError, KeyError, IndexError, TypeError):
            return f"--config.{key}: {spec} has no such entry"
    return None


def _one_line(e: BaseException) -> str:
    """An exception's message on one line: a traceback inside it (config_flags quotes the
    config file's) shortened to its last line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if any(line.startswith("Traceback") for line in lines) or len(lines) > 2:
        return f"{lines[0].removesuffix(':')}: {lines[-1]}" if len(lines) > 1 else lines[0]
    return " ".join(lines)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show the traceback of an error in the input too (also: "
                             "BLIP2_JAX_TRACEBACK=1)")


def report_errors(prog: str, run: Callable[[], object], errors: tuple,
                  verbose: bool = False) -> int:
    """`run()`, with an exception of `errors` (bad input: its message names the problem and the
    fix) printed as one line `PROG: error: ...` and exit status 2; any other exception (a bug)
    keeps its traceback, as do these with `verbose` or BLIP2_JAX_TRACEBACK=1."""
    try:
        run()
    except errors as e:
        if verbose or os.environ.get("BLIP2_JAX_TRACEBACK"):
            raise
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """--coordinator-address / --num-processes / --process-id / --distributed, as an argument
    group of `parser`; `initialize_distributed(args)` acts on them."""
    group = parser.add_argument_group(
        "multi-host (jax.distributed)",
        "the same flags on every host: an explicit coordinator and process, or --distributed")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="jax.distributed coordinator (process 0's address)")
    group.add_argument("--num-processes", type=int, metavar="N",
                       help="jax.distributed process count")
    group.add_argument("--process-id", type=int, metavar="I",
                       help="jax.distributed index of this process")
    group.add_argument("--distributed", action="store_true",
                       help="jax.distributed.initialize() with the platform's own detection "
                            "(TPU pod, SLURM, Kubernetes)")


def initialize_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize as the add_distributed_arguments flags say (nothing without
    them)."""
    coordinator = getattr(args, "coordinator_address", None)
    num_processes = getattr(args, "num_processes", None)
    if coordinator or num_processes:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=getattr(args, "process_id", None))
    elif getattr(args, "distributed", False):
        jax.distributed.initialize()


def setup(args: argparse.Namespace) -> None:
    """Quiet library logging, ours at INFO; then `jax.distributed.initialize` when the flags
    ask for it."""
    absl_logging.set_verbosity(absl_logging.WARNING)     # orbax / tfds chatter
    logging.getLogger("blip2_jax").setLevel(logging.INFO)
    initialize_distributed(args)
