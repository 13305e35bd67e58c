"""cli: the ``cssfs`` command line -- argument parsing, exit codes, error reporting, logging.

What it knows: the global options, how every error becomes one line on stderr and an exit code
(``ExitCode``, the stable contract in docs/CLI.md), and which ``cmd_*`` modules hold the
commands. What it must not know: how any command works. Each ``cssfs/cmd_*.py`` module (all
are found by name; COMMAND_MODULES fixes the order of the known ones) exposes
``register(subparsers)``, adds its subcommands and sets ``func`` (``(args) -> int | None``) on
them. A handler raises CliError (or any CssfsError/OSError) to fail; it never prints errors.

Importing this module loads no command, no trio and no pyfuse3. Start-up is part of every
command's time (``cssfs encrypt`` of a small file is mostly start-up), so a command line is
parsed by a parser that holds only the module of the command it names: ``COMMANDS`` maps each
command name to its module, and ``command_of(argv)`` finds the name past the global options.
Everything else (``--help`` without a command, a name not in the table -- a new cmd_*.py, or a
typo --, an unknown global option) builds the full parser from every cmd_*.py, so ``cssfs
--help`` lists every command and a usage error reads as before; ``--version`` builds a parser
with no commands. cmd_store / cmd_mount, which may be missing, must import trio, pyfuse3 and
boto3 inside their handlers only, so ``cssfs keygen`` works on a machine without libfuse.

The global options (``-i/--identity``, ``--passphrase-file``, ``--debug``, ``--debug-module``)
are accepted before the command and after it (``cssfs -i F decrypt`` and ``cssfs decrypt -i F``),
so no command may define options with these names.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import logging
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

from cssfs import __version__
from cssfs.errors import (
    AccessDeniedError,
    ConfigError,
    CssfsError,
    FormatError,
    HeaderAuthError,
    JournalError,
    KeyFormatError,
    NoIdentityMatchError,
    NoSuchBucketError,
    NoSuchObjectError,
    PassphraseError,
    PayloadError,
    PreconditionFailedError,
    SignatureError,
    StoreError,
    StoreUnavailableError,
    UnsupportedVersionError,
    UntrustedWriterError,
)

# What register() receives: ``def register(commands: Subparsers) -> None``. (argparse's class is
# generic only to type checkers.)
if TYPE_CHECKING:
    from cssfs.keys import Identity

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction
Handler: TypeAlias = Callable[[argparse.Namespace], "int | None"]

log = logging.getLogger(__name__)

PROG = "cssfs"
# Command modules, in the order their commands appear in --help. The optional ones are written
# by other parts of the project and may not exist in a given checkout.
COMMAND_MODULES = ("cmd_keys", "cmd_crypt", "cmd_store", "cmd_mount")
OPTIONAL_COMMAND_MODULES = frozenset({"cmd_store", "cmd_mount"})
#: Which module registers each command (aliases included). Only a start-up shortcut: a name
#: missing here still works through the full parser (tests/test_cli.py checks the table
#: against what the modules register).
COMMANDS: dict[str, str] = {
    **dict.fromkeys(("keygen", "whoami", "export", "import", "contacts"), "cmd_keys"),
    **dict.fromkeys(("encrypt", "decrypt", "inspect"), "cmd_crypt"),
    **dict.fromkeys(("put", "get", "cat", "ls", "rm"), "cmd_store"),
    **dict.fromkeys(("mount", "umount", "unmount", "sync", "status"), "cmd_mount"),
    "fsck": "cmd_fsck",
    "service": "cmd_service",
    **dict.fromkeys(("share", "unshare", "access", "group"), "cmd_share"),
}
# The global options that take a value (the next argument unless written --opt=value / -iVALUE).
_GLOBAL_WITH_VALUE = frozenset({"-i", "--identity", "--passphrase-file", "--debug-module"})
_GLOBAL_FLAGS = frozenset({"--debug"})


class ExitCode(IntEnum):
    """Every exit status of ``cssfs``; documented in docs/CLI.md. Never renumber one."""

    OK = 0
    ERROR = 1  # an internal error (a bug) or an error of no more specific kind
    USAGE = 2  # bad command line (argparse)
    BAD_INPUT = 10  # not a cssfs envelope, or a malformed one (header failure)
    UNSUPPORTED_VERSION = 11  # an envelope or key file of an unknown format version
    NO_MATCHING_IDENTITY = 12  # the file is not encrypted for this identity
    HEADER_AUTH = 13  # the header does not authenticate (tampered, or bound to another object)
    SIGNATURE = 14  # the writer's signature does not verify
    PAYLOAD = 15  # the payload does not authenticate: tampered, truncated, extended
    UNTRUSTED_WRITER = 16  # the writer is not a contact and only trusted writers are accepted
    DAMAGED = 17  # fsck found objects that do not verify (its report names them)
    PASSPHRASE = 20  # wrong passphrase for the identity file
    KEY_FORMAT = 21  # a malformed identity file, recipient string or PEM key
    CONFIG = 22  # missing identity, unknown contact, bad option value or config file
    NOT_FOUND = 30  # no such object or bucket in the store
    STORE_UNAVAILABLE = 31  # the store cannot be reached (after retries)
    ACCESS_DENIED = 32  # the store refused the credentials or the operation
    PRECONDITION = 33  # another client changed the object first (conditional write failed)
    STORE = 34  # any other store failure
    IO = 40  # a local file (or the mount's journal) could not be read or written
    MOUNT = 50  # the filesystem could not be mounted or unmounted
    INTERRUPTED = 130  # SIGINT / Ctrl-C (128 + 2, as shells report it)


class CliError(CssfsError):
    """A failure to report as one line on stderr with a given exit code (S3QL's QuietError)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.ERROR) -> None:
        super().__init__(message)
        self.code = code


# Looked up along the exception's MRO, so the most specific class wins.
_ERROR_CODES: dict[type[BaseException], ExitCode] = {
    UnsupportedVersionError: ExitCode.UNSUPPORTED_VERSION,
    KeyFormatError: ExitCode.KEY_FORMAT,
    FormatError: ExitCode.BAD_INPUT,
    NoIdentityMatchError: ExitCode.NO_MATCHING_IDENTITY,
    HeaderAuthError: ExitCode.HEADER_AUTH,
    SignatureError: ExitCode.SIGNATURE,
    PayloadError: ExitCode.PAYLOAD,
    UntrustedWriterError: ExitCode.UNTRUSTED_WRITER,
    PassphraseError: ExitCode.PASSPHRASE,
    ConfigError: ExitCode.CONFIG,
    NoSuchObjectError: ExitCode.NOT_FOUND,
    NoSuchBucketError: ExitCode.NOT_FOUND,
    StoreUnavailableError: ExitCode.STORE_UNAVAILABLE,
    AccessDeniedError: ExitCode.ACCESS_DENIED,
    PreconditionFailedError: ExitCode.PRECONDITION,
    StoreError: ExitCode.STORE,
    JournalError: ExitCode.IO,
    OSError: ExitCode.IO,
    CssfsError: ExitCode.ERROR,
}


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code an exception maps to (ExitCode.ERROR for anything unexpected)."""
    if isinstance(exc, CliError):
        return exc.code
    for cls in type(exc).__mro__:
        if cls in _ERROR_CODES:
            return _ERROR_CODES[cls]
    return ExitCode.ERROR


def describe(exc: BaseException) -> str:
    """One line about ``exc`` for the user: the message; for an OSError, the path(s) first."""
    if isinstance(exc, OSError) and not isinstance(exc, CssfsError):
        reason = exc.strerror or str(exc)
        if exc.filename is not None and exc.filename2 is not None:
            return f"{os.fsdecode(exc.filename)} -> {os.fsdecode(exc.filename2)}: {reason}"
        if exc.filename is not None:
            return f"{os.fsdecode(exc.filename)}: {reason}"
        return reason
    return str(exc) or type(exc).__name__


def about(what: str, exc: CssfsError | OSError) -> CliError:
    """``exc`` as a CliError whose message starts with ``what`` (usually a file name)."""
    message = describe(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return CliError(message, exit_code_for(exc))  # the path is already in it
    return CliError(f"{what}: {message}", exit_code_for(exc))


def report(message: str) -> None:
    """Print ``message`` as the one error line on stderr."""
    line = " ".join(message.splitlines()).strip()
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


# -- global options and the parser -------------------------------------------------------------

_GLOBAL_DEFAULTS: dict[str, Any] = {
    "identity": None,
    "passphrase_file": None,
    "debug": False,
    "debug_module": [],
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that accepts the global options, at the top and in every command.

    They default to SUPPRESS everywhere, so a command's parser never overwrites a value given
    before the command; main() fills in the real defaults after parsing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: `--passphrase x` must not mean `--passphrase-file x`, and a new
        # option must never change what an existing command line means.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        group = self.add_argument_group("global options")
        group.add_argument(
            "-i", "--identity", metavar="FILE", default=argparse.SUPPRESS,
            help="identity file (default: $CSSFS_IDENTITY, else "
            "$XDG_CONFIG_HOME/cssfs/identity)",
        )
        group.add_argument(
            "--passphrase-file", metavar="FILE", default=argparse.SUPPRESS,
            help="read the identity's passphrase from FILE (default: $CSSFS_PASSPHRASE_FILE, "
            "the systemd credential cssfs-passphrase, else a prompt on a terminal)",
        )
        group.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS,
            help="log cssfs debug messages to stderr",
        )
        group.add_argument(
            "--debug-module", metavar="NAME", action="append", default=argparse.SUPPRESS,
            help="log debug messages of logger NAME (e.g. cssfs.fs, botocore); repeatable",
        )


def command_module_names() -> list[str]:
    """Every command module: the known ones in their order, then any other cssfs/cmd_*.py (a
    new command group needs no edit here). Listing the package directory imports nothing."""
    import cssfs

    extra = sorted(
        info.name for info in pkgutil.iter_modules(cssfs.__path__)
        if info.name.startswith("cmd_") and info.name not in COMMAND_MODULES
    )
    return [*COMMAND_MODULES, *extra]


def _import_command_module(name: str) -> ModuleType | None:
    """``cssfs.<name>``, or None if it is an optional module this checkout lacks."""
    qualified = f"cssfs.{name}"
    try:
        return importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        # Only the absence of the optional module itself is expected; anything it fails
        # to import is a real error and propagates.
        if name not in OPTIONAL_COMMAND_MODULES or exc.name != qualified:
            raise
        return None


def _command_modules(names: Sequence[str] | None = None) -> Iterator[ModuleType]:
    for name in command_module_names() if names is None else names:
        module = _import_command_module(name)
        if module is not None:
            yield module


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first argument past the global options); None when
    there is none, or before it an option that is not a global one (``--help``, ``--version``,
    a typo): only the full parser can answer those."""
    args = iter(argv)
    for arg in args:
        if arg in _GLOBAL_WITH_VALUE:
            next(args, None)
        elif arg in _GLOBAL_FLAGS or arg.startswith(("--identity=", "--passphrase-file=",
                                                     "--debug-module=")):
            continue
        elif arg.startswith("-i") and not arg.startswith("--"):
            continue  # -iFILE
        elif arg.startswith("-"):
            return None
        else:
            return arg
    return None


def _modules_for(argv: Sequence[str]) -> list[str] | None:
    """The command modules a parser for ``argv`` needs: the one that holds its command, none
    for a bare ``--version``, None (all of them) for anything else."""
    command = command_of(argv)
    if command is None:
        before = list(argv)
        for stop, arg in enumerate(before):
            if arg in ("-h", "--help", "--"):
                before = before[:stop]
                break
        return [] if "--version" in before else None
    name = COMMANDS.get(command)
    if name is None or importlib.util.find_spec(f"cssfs.{name}") is None:
        return None
    return [name]


def build_parser(modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the commands of ``modules`` (names such as ``"cmd_store"``) registered;
    by default every available command."""
    parser = _Parser(
        prog=PROG,
        description="cssfs: files encrypted for people's public keys, on S3 or any folder.",
        epilog="Run `cssfs COMMAND --help` for a command's options. Exit codes: docs/CLI.md.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules(modules):
        module.register(commands)
    return parser


# -- start-up ---------------------------------------------------------------------------------


@contextlib.contextmanager
def startup() -> Iterator[None]:
    """Pause the cyclic garbage collector for a stretch of a command's start-up: imports, the
    parser, an S3 client's service models (botocore parses megabytes of JSON) create hundreds of
    thousands of long-lived objects and almost no garbage, and the collections they trigger
    cost ~40 ms of a ``cssfs get``. At the end what exists is frozen (``gc.freeze``: moved out
    of the generations the collector scans; reference counting still frees it), so the first
    collection after start-up does not scan it all either. Only bounded stretches run under
    it; the command's work runs with the collector on. Nested uses are fine. Freezing is for a
    process that runs one command (``main()`` with no argv): an in-process caller (the tests)
    keeps its garbage collectable."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if _whole_process:
            gc.freeze()
        gc.enable()


_whole_process = False  # main() runs the process's one command (set from argv=None)


# -- identity, shared by the commands ----------------------------------------------------------


def load_identity(args: argparse.Namespace) -> Identity:
    """The identity the global options name (-i, --passphrase-file, their env defaults)."""
    from cssfs import config

    path = config.identity_path(args.identity)
    return config.load_identity(path, config.passphrase_source(path, args.passphrase_file))


# -- S3 options, shared by the commands that open a store ---------------------------------------

#: open_store's keywords that the S3 options set (cssfs.store.url).
STORE_OPTIONS = ("endpoint_url", "region", "profile", "path_style")


def add_store_options(p: argparse.ArgumentParser) -> None:
    """``--endpoint-url``, ``--region``, ``--profile``, ``--path-style`` (read by
    store_options) on a command that opens a store."""
    g = p.add_argument_group("S3 options (also from AWS_* environment variables and ~/.aws)")
    g.add_argument("--endpoint-url", metavar="URL",
                   help="S3 endpoint (default: AWS, or $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)")
    g.add_argument("--region", metavar="NAME", help="S3 region")
    g.add_argument("--profile", metavar="NAME", help="AWS profile")
    g.add_argument("--path-style", action="store_true", default=None,
                   help="path-style addressing (http://host/bucket/key; most S3-compatible "
                   "servers)")


def store_options(args: argparse.Namespace) -> dict[str, Any]:
    """The S3 options given on the command line, as ``open_store(url, **...)`` keywords
    (those not given are left out: the environment and ~/.aws decide)."""
    given = {name: getattr(args, name, None) for name in STORE_OPTIONS}
    return {name: value for name, value in given.items() if value is not None}


def store_option_args(args: argparse.Namespace) -> list[str]:
    """The S3 options given, as command-line arguments again (a command that runs another)."""
    out: list[str] = []
    for name, value in store_options(args).items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


# -- logging ----------------------------------------------------------------------------------

_SYSLOG_PRIORITY = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    """No timestamp (journald adds one) and a ``<N>`` syslog priority prefix journald reads."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected; a child whose
    # stderr was redirected elsewhere inherits the variable, so compare.
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _DebugFilter(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self._prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return any(record.name == p or record.name.startswith(p + ".") for p in self._prefixes)


@contextlib.contextmanager
def _logging(debug: bool, modules: Sequence[str]) -> Iterator[None]:
    """Log warnings (and, for the debugged loggers, everything) to stderr while a command runs."""
    prefixes = ["cssfs"] if debug else []
    prefixes += [m for m in modules if m not in prefixes]
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if prefixes else logging.WARNING)
    handler.addFilter(_DebugFilter(prefixes))
    saved = {name: logging.getLogger(name).level for name in prefixes}
    for name in prefixes:
        logging.getLogger(name).setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


# -- main -------------------------------------------------------------------------------------


def _silence_stdout() -> None:
    # After EPIPE, make the interpreter's final flush of stdout harmless.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cssfs`` with ``argv`` (default: sys.argv[1:]); return the exit status."""
    global _whole_process
    if argv is None:
        _whole_process = True
        argv = sys.argv[1:]
    argv = list(argv)
    try:
        with startup():
            parser = build_parser(_modules_for(argv))
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # --help, --version, or a usage error already printed
                return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    except KeyboardInterrupt:
        report("interrupted")
        return ExitCode.INTERRUPTED
    for name, default in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, list(default) if isinstance(default, list) else default)

    handler: Handler = args.func
    with _logging(args.debug, args.debug_module):
        try:
            result = handler(args)
            sys.stdout.flush()
        except KeyboardInterrupt:
            report("interrupted")
            return ExitCode.INTERRUPTED
        except BrokenPipeError:
            _silence_stdout()
            report("output closed before the end (broken pipe)")
            return ExitCode.IO
        except (CssfsError, OSError) as exc:
            log.debug("%s failed", args.command, exc_info=True)
            report(describe(exc))
            return exit_code_for(exc)
        except Exception as exc:
            # A bug. Its message may quote data, so only the type is shown; --debug logs all.
            log.debug("internal error", exc_info=True)
            report(f"internal error ({type(exc).__name__}); run with --debug for the traceback")
            return ExitCode.ERROR
    return ExitCode.OK if result is None else int(result)
