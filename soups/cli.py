"""Hydra entry points that keep the CLI promise: a bad command line is one `error: ...` line and exit 2.

`@hydra.main` prints a composition error (unknown key, unknown group option, unparsable override) over several
lines and exits 1, and it accepts `seed=abc` as a string that only fails later, with a traceback. Every entry
point instead uses

    from soups.cli import precheck

    precheck(__name__, __file__, "../configs/mix")  # before the heavy imports: a typo fails in a second

    ...

    @entry("../configs/mix")
    def main(cfg: DictConfig) -> None: ...

`check_command_line` composes the config from `sys.argv` with `hydra.compose` before Hydra runs, names the
offending override and lists the valid options or keys. The run itself is still `hydra.main` (multirun `-m`,
`hydra.*` overrides, `--cfg`, `--help` unchanged), and its body is wrapped in `soups.utils.cli_errors`.

This module imports only hydra, omegaconf and `evals.errors`, so that `precheck` runs before torch is loaded.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evals.errors import SoupsError

# Flags under which Hydra does not compose the app's config (help, shell completion, ...): left to Hydra.
_NO_COMPOSE_FLAGS = ("help", "hydra_help", "info", "shell_completion", "experimental_rerun")
# Multirun: at most this many expanded jobs are composed here; Hydra still composes every job itself.
_MAX_SWEEP_CHECKS = 64
# Command lines already checked, so `precheck` and `entry` compose them once.
_CHECKED: set[tuple[str, str, tuple[str, ...]]] = set()


class CommandLineError(SoupsError):
    """A bad override on the command line; `entry`/`precheck` print it as one `error: ...` line (exit 2).

    A `SoupsError`, so `except SoupsError` catches it too; `SoupsError` comes from `evals.errors`, which imports
    nothing (`soups.utils`, which re-exports it, imports torch), so it can be raised before torch is loaded.
    """


def _one_line(text: Any) -> str:
    # Hydra appends its config search path to "could not find" errors: noise on a one-line error.
    return " ".join(str(text).split("Config search path:")[0].split())


def _fail(message: str) -> None:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(2)


def _config_dir(module_file: str, config_path: str) -> Path:
    return (Path(module_file).resolve().parent / config_path).resolve()


# ---------------------------------------------------------------------------------------------------------------
# Checking a command line
# ---------------------------------------------------------------------------------------------------------------


def group_options(config_dir: Path, group: str) -> list[str]:
    """The options of a config group: `<config_dir>/<group>/**/*.yaml`, as `sub/name` without the suffix."""
    root = config_dir / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _is_group(config_dir: Path, key: str) -> bool:
    return not key.startswith("hydra") and (config_dir / key).is_dir()


def _check_group_choice(config_dir: Path, group: str, value: Any) -> None:
    """Refuses an option (or list of options) that is not a file in the group's directory."""
    options = group_options(config_dir, group)
    for choice in value if isinstance(value, list) else [value]:
        if choice is None or str(choice) in options:
            continue
        close = difflib.get_close_matches(str(choice), options, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CommandLineError(f"unknown {group} {choice!r} ({config_dir.name}/{group}/{choice}.yaml does not "
                               f"exist); {hint}valid {group} options: {', '.join(options) or '(none)'}")  # fmt: skip


def _check_key(cfg: Any, key: str, value: Any) -> None:
    """Refuses `key=value` for a key the composed config lacks, listing the keys of its nearest parent, and a
    scalar in place of a section (`ppo=5`), which Hydra accepts and the run would trip over later."""
    from omegaconf import DictConfig, OmegaConf

    parts = key.split(".")
    node, depth = cfg, 0
    for part in parts:
        if not isinstance(node, DictConfig):
            return  # a list index or a value's attribute: Hydra's own check below is precise enough
        if part not in node.keys():  # keys(), not `in`: a `???` value is declared but `in` is False for it
            break
        node = node._get_node(part)
        node = node if OmegaConf.is_config(node) else None
        depth += 1
    else:
        if isinstance(node, DictConfig) and value is not None and not isinstance(value, dict):
            keys = ", ".join(str(k) for k in node.keys())
            raise CommandLineError(f"{key}={value!r}: {key} is a section, not a value; set its keys "
                                   f"({key}.<key>=...), one of: {keys}")  # fmt: skip
        return
    parent = ".".join(parts[:depth])
    valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(parts[depth], valid, n=1)
    hint = f"did you mean {'.'.join([*parts[:depth], close[0]])!r}? " if close else ""
    where = f"under {parent}" if parent else "at the top level"
    raise CommandLineError(f"unknown key {key!r} (add a new key with +{key}=...); {hint}valid keys {where}: "
                           f"{', '.join(valid)}")  # fmt: skip


def _seed_keys(cfg: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for k in cfg.keys():
        node = cfg._get_node(k)
        path = f"{prefix}{k}"
        if isinstance(node, DictConfig):
            keys += _seed_keys(node, f"{path}.")
        elif str(k) == "seed" or str(k).endswith("_seed"):
            keys.append(path)
    return keys


def _check_seeds(defaults: Any, cfg: Any) -> None:
    """Every `seed`/`*_seed` key must be an integer (or null where `defaults`, the config before the value
    overrides, has null): `seed=abc` would otherwise reach `torch.manual_seed` and fail there in a traceback."""
    from omegaconf import OmegaConf

    for key in _seed_keys(defaults):
        default = OmegaConf.select(defaults, key, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if isinstance(value, int) and not isinstance(value, bool):
            continue
        if value is None and default is None:
            continue
        allowed = "an integer or null" if default is None else "an integer"
        raise CommandLineError(f"{key}={value!r} is not {allowed}")


def _sweep_values(override: Any, config_dir: Path) -> list[str] | None:
    """The values of a multirun sweep override, or None when they cannot be listed here (e.g. an interval)."""
    from hydra.core.override_parser.types import Glob

    value = override.value()
    if isinstance(value, Glob):
        group = override.key_or_group
        return value.filter(group_options(config_dir, group)) if _is_group(config_dir, group) else None
    if override.is_discrete_sweep():
        return list(override.sweep_string_iterator())
    return None


def _expand(overrides: Sequence[Any], config_dir: Path, multirun: bool) -> list[list[str]]:
    """The override lists to compose: one, or in multirun enough jobs that every swept value appears once."""
    if not multirun or not any(o.is_sweep_override() for o in overrides):
        return [[o.input_line for o in overrides]]
    columns: list[list[str]] = []
    for o in overrides:
        values = _sweep_values(o, config_dir) if o.is_sweep_override() else None
        if not o.is_sweep_override():
            columns.append([o.input_line])
        elif values:
            columns.append([f"{o.get_key_element()}={v}" for v in values])
        # else: not expandable here (an interval sweep for an optimiser); Hydra composes it per job
    rows = min(max(len(c) for c in columns), _MAX_SWEEP_CHECKS) if columns else 1
    return [[c[i % len(c)] for c in columns] for i in range(rows)]


def _compose(config_dir: Path, config_name: str, overrides: Sequence[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _check_job(config_dir: Path, config_name: str, lines: Sequence[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(lines))
    groups = [o for o in parsed if _is_group(config_dir, o.key_or_group)]
    for o in groups:
        if not o.is_delete():
            _check_group_choice(config_dir, o.key_or_group, o.value())
    try:
        base = _compose(config_dir, config_name, [o.input_line for o in groups])
    except Exception as err:  # noqa: BLE001 - any composition failure is a bad command line
        raise CommandLineError(_one_line(err)) from err
    for o in parsed:
        if o in groups or o.is_add() or o.is_force_add() or o.is_delete() or o.key_or_group.startswith("hydra"):
            continue
        _check_key(base, o.key_or_group, None if o.is_sweep_override() else o.value())
    try:
        cfg = _compose(config_dir, config_name, lines)
    except Exception as err:  # noqa: BLE001 - e.g. a type error on a typed node, `+key` on an existing key
        raise CommandLineError(_one_line(err)) from err
    _check_seeds(base, cfg)


def check_command_line(config_dir: str | Path, config_name: str = "config", argv: Sequence[str] | None = None) -> None:
    """Composes `config_name` from `config_dir` with the overrides in `argv` (default `sys.argv[1:]`).

    Args:
        config_dir: The entry point's config directory.
        config_name: The primary config file, without `.yaml`.
        argv: The command line after the program name, as Hydra parses it (`-m`, `--cfg job`, ...).

    Raises:
        CommandLineError: an unparsable override, an unknown key or group option (the valid ones listed), any
            other composition error, or a `seed`/`*_seed` that is not an integer.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    config_dir = Path(config_dir).resolve()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in _NO_COMPOSE_FLAGS) or args.config_path or args.config_dir:
        return  # Hydra's own handling: help text, or a config from elsewhere
    config_name = args.config_name or config_name
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as err:
        raise CommandLineError(f"cannot parse the overrides: {_one_line(err)}") from err
    for lines in _expand(parsed, config_dir, args.multirun):
        _check_job(config_dir, config_name, lines)


def progress_bars_for_terminals_only() -> None:
    """Turns progress bars off when stderr is not a terminal (a log file, a pipe, a CI console).

    A bar redraws itself with carriage returns; in a file every redraw is appended to one ever-growing line.
    Covers tqdm's default (`TQDM_DISABLE`; bars built with an explicit `disable=False` still show) and the
    Hugging Face bars ("Loading weights", "Writing model shards"), which transformers reads from
    `HF_HUB_DISABLE_PROGRESS_BARS` when imported. Variables the user set are left as they are.
    """
    if sys.stderr.isatty():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()


def bar_disabled(enabled: bool) -> bool | None:
    """tqdm's `disable=` for a bar: True when not wanted, else None, with which tqdm draws only on a terminal.

    (`disable=False` would draw into log files too, one ever-growing line of carriage-return redraws.)
    """
    return None if enabled else True


def _cpu_thread_defaults() -> None:
    # OpenMP threads that find no work spin instead of sleeping (libgomp's ACTIVE wait). On a CPU shared with
    # other processes the spinners steal the cores the working threads need: a torch matmul loop with one
    # busy process beside it on 2 cores took 57-95 s instead of 3 s (report in the README). PASSIVE keeps torch's
    # threads and removes the spinning. Read when torch initialises OpenMP, hence set before torch is imported;
    # a value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _silence_known_library_warnings() -> None:
    # peft (0.21) reads `model.is_gradient_checkpointing` in PeftModel.__init__, a property transformers 5
    # deprecates with a FutureWarning on every adapter we build; nothing in our code reads it. Only that message.
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _check_once(config_dir: Path, config_name: str) -> None:
    key = (str(config_dir), config_name, tuple(sys.argv[1:]))
    if key in _CHECKED:
        return
    try:
        check_command_line(config_dir, config_name)
    except CommandLineError as err:
        _fail(str(err))
    _CHECKED.add(key)


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def precheck(module_name: str, module_file: str, config_path: str, config_name: str = "config") -> None:
    """Checks the command line of a script run as `__main__`, before its heavy imports; a no-op on import.

    A mistake then costs a second (hydra's compose) instead of importing torch, transformers, ... first.

    Args:
        module_name: The calling module's `__name__`.
        module_file: The calling module's `__file__`.
        config_path: The config directory, relative to the module's directory (as given to `entry`).
        config_name: The primary config file, without `.yaml`.
    """
    if module_name == "__main__":
        _cpu_thread_defaults()
        progress_bars_for_terminals_only()
        _silence_known_library_warnings()
        _check_once(_config_dir(module_file, config_path), config_name)


def entry(config_path: str, config_name: str = "config") -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """`@hydra.main` plus the command-line check, with the body's `SoupsError`s as one line and exit 2.

    Args:
        config_path: The config directory, relative to the decorated function's file.
        config_name: The primary config file, without `.yaml`.

    Returns:
        A decorator; the decorated `main()` reads `sys.argv`, `main(cfg)` runs the body on a composed config
        (as with `hydra.main`), and `inspect.unwrap(main)` is the undecorated body.
    """

    def decorate(fn: Callable[[Any], Any]) -> Callable[..., Any]:
        import hydra

        from soups.utils import cli_errors

        config_dir = _config_dir(inspect.getfile(fn), config_path)
        # An absolute config path: Hydra would otherwise resolve it against the file of the innermost wrapper.
        run = hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(cli_errors(fn))

        @functools.wraps(fn)
        def main(cfg_passthrough: Any = None) -> Any:
            if cfg_passthrough is None:
                progress_bars_for_terminals_only()
                _silence_known_library_warnings()
                _check_once(config_dir, config_name)
            return run(cfg_passthrough)

        return main

    return decorate
