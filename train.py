"""Command line entry point: ``python train.py --config configs/quickstart.py --workdir runs/quick``.

Any config field can be overridden, e.g. ``--config.anchor.ratio=0.4 --config.num_seeds=8``.
Rerunning the same command on the same workdir resumes from the last checkpoint.

On a CPU-only machine the CPU is split into one JAX device per core (``--cpu_devices``), so the
seeds, which are sharded over devices, train in parallel on all cores; GPUs and TPUs are used
as they are.

Several processes or hosts (every kind: the run axis, or a federated run's clients, is split
over every process's devices): start the same command once per process with
``--coordinator=HOST:PORT --num_processes=N --process_id=I`` (``--coordinator=auto`` on TPU pods
and SLURM, where JAX finds them itself). Every process reads the same ``--workdir`` (a shared
filesystem on several hosts); process 0 locks it and writes the metrics and the report, all of
them write the orbax checkpoints. docs/howto/multihost.md has the commands.

Config fields: ``--print_config`` prints every field with its value (after the overrides) as
JSON and exits; ``--config.<field>=<value>`` sets one (a misspelled field is named with the
closest match). ``python train.py --config configs/quickstart.py --print_config`` lists them all.

Checking a command: ``--dry_run`` makes every check a run makes before it trains (config and
overrides, model, data source and prepared data, anchor patterns, the workdir and its
``config.json``), builds the model abstractly (``jax.eval_shape``), prints what would run and
exits without training or writing anything.

Errors: a bad flag, config field, model or data source, an unprepared dataset, a workdir that
is a file, read-only or holds another config, a full disk or a diverged run print one line on
stderr naming the field, file or value, and exit 2; nothing in the workdir is overwritten, and
a first start that fails leaves no workdir behind. ``--verbose`` adds the traceback.

Exit codes: 0 done; 2 one of the errors above; 130 interrupted by Ctrl-C before training began
(nothing to resume) or after a checkpoint; 143 stopped by SIGTERM/SIGINT during training after
checkpointing (rerun to resume); 1 an unexpected error (a bug: the traceback is printed).
"""

import os
import re
import signal
import sys
import threading

INTERRUPTED_EXIT = 130  # 128 + SIGINT


def _interrupted_while_starting(signum, frame):
    # Ctrl-C while Python imports JAX and friends (seconds): nothing is written yet, so leave at
    # once with one line rather than a traceback through the import machinery.
    sys.stderr.write("train.py: interrupted (Ctrl-C) while starting; nothing was written.\n")
    os._exit(INTERRUPTED_EXIT)


if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from absl import app, flags, logging  # noqa: E402 (after the handler above, on purpose)
from ml_collections import config_flags  # noqa: E402

from tna_jax import checkpoint as ckpt_lib  # noqa: E402
from tna_jax import config as config_lib  # noqa: E402
from tna_jax import data, dry_run, preflight, runner, training  # noqa: E402
from tna_jax import workdir as workdir_lib  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines --config, --workdir and --cpu_devices on `flag_values`."""
    config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True,
                                    flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints and the report.",
                        flag_values=flag_values)
    flags.DEFINE_string("cpu_devices", "auto", "JAX CPU devices: 'auto' (one per core, at most 8), an integer, "
                        "or 'off' to leave XLA_FLAGS alone. Ignored when XLA_FLAGS already sets a device count.",
                        flag_values=flag_values)
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for a run over several processes "
                        "(jax.distributed); 'auto' lets JAX detect it (TPU pods, SLURM). Unset: one process.",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator).", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes) (with --coordinator).",
                         flag_values=flag_values)
    flags.DEFINE_bool("print_config", False, "Print every config field with its value (after the overrides) as JSON "
                      "and exit; --workdir is not needed then.", flag_values=flag_values)
    flags.DEFINE_bool("dry_run", False, "Check everything a run checks before training (config, overrides, model, data, "
                      "anchors, workdir; the model built abstractly) and exit without training or writing; "
                      "--workdir is optional then.", flag_values=flag_values)
    flags.DEFINE_bool("verbose", False, "Print the traceback of an error, not only its one-line message.",
                      flag_values=flag_values)
    flags.mark_flags_as_required(["config"], flag_values=flag_values)


define_flags()

# Errors whose message says everything (the field, file or holder); shown without a traceback.
USER_ERRORS = (config_lib.ConfigError, data.DataError, ckpt_lib.CheckpointError, workdir_lib.WorkdirBusy,
               preflight.WorkdirError, training.TrainingDiverged)
USER_ERROR_EXIT = 2  # as argparse and absl's usage errors: the command, not the program, must change


def _config_arg(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _overrides(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0].lstrip("-") for a in argv if re.match(r"^--?(no)?config\.", a)]


def _one_line(text: str) -> str:
    """The first and last meaningful lines of a (possibly traceback-laden) message."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    if "Traceback (most recent call last):" in lines:
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines[:6])


def _config_file_line(err: BaseException, path: str) -> int | None:
    """The line of the config file where `err` was raised (None if it was raised elsewhere)."""
    target = os.path.abspath(path.split(":", 1)[0])
    line, tb = None, err.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _load_config(path: str):
    """``get_config()`` of a config file, as ml_collections' flag loads it (``file.py:arg`` passes
    ``arg``); None when it cannot be loaded (the flag's own parsing then says why)."""
    import importlib.util

    file, _, arg = path.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("tna_jax_config_preview", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:
        return None


def _checked_overrides(argv: list[str], path: str) -> list[str]:
    """`argv` with every ``--config.<field>=...`` checked against the config file's fields
    (`tna_jax.config.check_override`): an unknown field is one line naming it and the closest one,
    and an old name of a renamed field is rewritten to the new one."""
    overrides = [i for i, a in enumerate(argv) if re.match(r"^--?(no)?config\.", a)]
    config = _load_config(path) if overrides else None
    if config is None:
        return argv
    out = list(argv)
    for i in overrides:
        flag, eq, value = argv[i].partition("=")
        dashes, negated, name = re.match(r"^(--?)(no)?config\.(.+)$", flag).groups()
        field = config_lib.check_override(config, name)
        out[i] = f"{dashes}{negated or ''}config.{field}{eq}{value}"
        if out[i] != argv[i] and argv[i] in sys.argv:  # ml_collections reads its overrides from sys.argv
            sys.argv[sys.argv.index(argv[i])] = out[i]
    return out


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """absl's flags parser for train.py: loads ``--config``, applies the overrides and validates
    the config (:func:`tna_jax.config.validate`), so that every mistake stops the program before
    it touches the workdir, with one line naming the file or the field
    (:func:`parse_flags_or_exit` prints it as ``FATAL Flags parsing error: ...`` and exits 1).

    Raises:
      absl.flags.Error: a config file that does not exist, does not parse or fails in
        ``get_config``; an override of a field that does not exist or with a value of the wrong
        type; a config that :func:`tna_jax.config.validate` rejects.
    """
    path = _config_arg(argv)
    try:
        argv = _checked_overrides(argv, path)
        rest = flag_values(argv)
        config = flag_values["config"].value
        if config is not None:
            config_lib.validate(config)
    except config_lib.ConfigError as err:
        field = re.search(r"config\.([\w.]+)", str(err))
        given = field and any(o == f"config.{field.group(1)}" for o in _overrides(argv))
        where = f"--config.{field.group(1)}" if given else f"--config={path}"
        raise flags.Error(f"{where}: {err}") from None
    except SyntaxError as err:
        text = (err.text or "").strip()
        raise flags.Error(f"--config={path}: syntax error in {err.filename}, line {err.lineno}: {err.msg}"
                          + (f": {text!r}" if text else "") + ".") from None
    except flags.Error as err:
        raise flags.Error(_one_line(str(err))) from None
    except Exception as err:  # the config file is user code: any failure in it is a config error
        line = _config_file_line(err, path)
        if line is not None:
            raise flags.Error(f"--config={path}: get_config failed at line {line}: {type(err).__name__}: "
                              f"{_one_line(str(err))}") from None
        if isinstance(err, (OSError, ImportError)):
            raise flags.Error(f"--config={path}: {_one_line(str(err))}") from None
        if isinstance(err, AttributeError) and "get_config" in str(err):
            raise flags.Error(f"--config={path}: the file defines no get_config() function.") from None
        if isinstance(err, (AttributeError, KeyError)):
            # ml_collections reports an unknown field as the repr of "'name'\nDid you mean ...".
            text = str(err)
            key = re.search(r"'([\w.-]+)\\?'", text)
            hint = re.search(r"Did you mean[^?]*\?", text)
            raise flags.Error(f"--config={path}: an override names a field the config does not have "
                              f"({', '.join(_overrides(argv))}): no field {key.group(1) if key else text!r}"
                              + (f"; {hint.group(0)}" if hint else "") + ".") from None
        raise flags.Error(f"--config={path} with overrides {_overrides(argv)}: {type(err).__name__}: "
                          f"{_one_line(str(err))}") from None
    return rest


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """:func:`parse_flags`, printing absl's one-line ``FATAL Flags parsing error`` and exiting 2."""
    try:
        return parse_flags(argv)
    except flags.Error as err:
        sys.stderr.write(f"FATAL Flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.\n")
        raise SystemExit(USER_ERROR_EXIT) from None


def configure_cpu_devices(setting: str) -> None:
    """Sets XLA's host device count before JAX starts its backends (it reads XLA_FLAGS once)."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if setting == "off" or "xla_force_host_platform_device_count" in xla_flags:
        return
    if setting == "auto":
        count = min(8, os.cpu_count() or 1)
    else:
        try:
            count = int(setting)
        except ValueError:
            raise app.UsageError(f"--cpu_devices must be 'auto', 'off' or a positive integer; got {setting!r}.") from None
        if count < 1:
            raise app.UsageError(f"--cpu_devices must be a positive integer; got {count}.")
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={count}".strip()


def check_distributed_flags(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Checks the several-process flags without starting anything (``--dry_run`` too).

    Raises:
      absl.app.UsageError: ``--num_processes``/``--process_id`` without ``--coordinator``, a
        coordinator that is not ``host:port``, or a process id outside ``[0, num_processes)``.
    """
    if not coordinator:
        if num_processes is not None or process_id is not None:
            raise app.UsageError("--num_processes and --process_id need --coordinator=HOST:PORT (or 'auto').")
        return
    if coordinator == "auto":
        return
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", coordinator):
        raise app.UsageError(f"--coordinator must be HOST:PORT or 'auto'; got {coordinator!r}.")
    if num_processes is None or num_processes < 1:
        raise app.UsageError(f"--num_processes must be a positive integer with --coordinator; got {num_processes!r}.")
    if process_id is None or not 0 <= process_id < num_processes:
        raise app.UsageError(f"--process_id must be in [0, {num_processes}) (--num_processes={num_processes}); "
                             f"got {process_id!r}.")


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """``jax.distributed.initialize`` from the flags (nothing without ``--coordinator``).

    Raises:
      absl.app.UsageError: as :func:`check_distributed_flags`.
    """
    import jax

    check_distributed_flags(coordinator, num_processes, process_id)
    if not coordinator:
        return
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def _fail(message: str, code: int, err: BaseException | None = None, *, now: bool = False) -> None:
    """Prints `message` as one line on stderr (and the traceback with --verbose), then exits.

    With `now`, leaves at once (``os._exit``): after a full disk, the writers still open
    (TensorBoard's, orbax's threads) would each print a traceback while closing, and there is
    nothing left to save.
    """
    if err is not None and FLAGS.verbose:
        import traceback

        traceback.print_exception(err)
    if now and not FLAGS.verbose:
        threading.excepthook = lambda args: None
        sys.unraisablehook = lambda args: None
    print(f"train.py: {message}", file=sys.stderr)
    if now:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code) from None


def _drop_out_of_space_logs(record) -> bool:
    """A logging filter: orbax logs a failed write's traceback from its own thread before the
    error reaches us; on a full disk our one line says it all (--verbose keeps the log)."""
    err = record.exc_info[1] if record.exc_info else None
    text = record.getMessage() if record.args is not None else str(record.msg)
    return not ((err is not None and preflight.out_of_space(err) is not None) or "No space left on device" in text)


def _event_loop_closed(err: BaseException | None) -> bool:
    return isinstance(err, RuntimeError) and str(err) == "Event loop is closed"


def _quiet_unraisablehook(hook):
    """``sys.unraisablehook`` without the "Event loop is closed" tracebacks that the native
    threads of orbax's writer print while a failed save unwinds, nor a Ctrl-C that Python could
    not raise (it landed in a garbage-collection callback: `_interrupt`'s timer leaves with one
    line instead); --verbose keeps them."""
    def quiet(unraisable):
        if not (_event_loop_closed(unraisable.exc_value) or isinstance(unraisable.exc_value, KeyboardInterrupt)):
            hook(unraisable)

    return quiet


# Seconds a Ctrl-C outside the training loop may take to unwind (undoing a first start, closing
# files) before the process leaves anyway: Python drops a KeyboardInterrupt that lands in a
# garbage-collection callback (JAX has one), and the run would go on as if nothing happened.
# Leaving hard is safe: every file tna_jax writes is written atomically.
INTERRUPT_GRACE_S = 10.0


def _interrupt(signum, frame):
    """SIGINT outside the training loop (which handles it itself: checkpoint, then stop)."""
    def leave():
        sys.stderr.write(f"train.py: interrupted (Ctrl-C); the workdir keeps its last complete checkpoint, if "
                         f"any: rerun the same command to resume ({FLAGS.workdir}).\n")
        os._exit(INTERRUPTED_EXIT)

    timer = threading.Timer(INTERRUPT_GRACE_S, leave)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def main(argv):
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, _interrupt)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.print_config:
        print(ckpt_lib.dumps(workdir_lib.config_dict(FLAGS.config), indent=2))
        return
    if FLAGS.dry_run:
        _dry_run()
        return
    if FLAGS.workdir is None:
        _fail("error: --workdir is required (the directory for config.json, metrics, checkpoints and the "
              "report; rerunning on the same workdir resumes).", USER_ERROR_EXIT)
    if not FLAGS.verbose:
        sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)
        logging.get_absl_handler().addFilter(_drop_out_of_space_logs)
    configure_cpu_devices(FLAGS.cpu_devices)
    initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if "verbosity" not in FLAGS or not FLAGS["verbosity"].present:
        # orbax logs every file operation at INFO and tfds warns of what our own errors explain.
        logging.set_verbosity(logging.WARNING if FLAGS.verbose else logging.ERROR)
    try:
        runner.run(FLAGS.config, FLAGS.workdir)
    except training.Preempted as stop:
        logging.warning("%s", stop)
        print(stop)
        raise SystemExit(143) from None  # 128 + SIGTERM: the job did not finish
    except KeyboardInterrupt as err:
        _fail(f"interrupted (Ctrl-C); the workdir keeps its last complete checkpoint, if any: rerun the same "
              f"command to resume ({FLAGS.workdir}).", INTERRUPTED_EXIT, err)
    except USER_ERRORS as err:
        full = preflight.out_of_space(err)
        if full is None:
            _fail(f"error: {err}", USER_ERROR_EXIT, err)
        _out_of_space(full, err)
    except Exception as err:
        full = preflight.out_of_space(err)
        if full is None:
            raise  # a bug: the traceback is what the report needs
        _out_of_space(full, err)


def _dry_run() -> None:
    """``--dry_run``: the flags, then `tna_jax.dry_run.dry_run`; one line per finding, or one error line."""
    configure_cpu_devices(FLAGS.cpu_devices)  # checks the value; JAX has not started its backends
    check_distributed_flags(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    try:
        lines = dry_run.dry_run(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as err:
        _fail(f"error: {err}", USER_ERROR_EXIT, err)
    for line in lines:
        print(f"dry run: {line}")
    print("dry run: nothing was trained or written.")


def _out_of_space(full: OSError, err: BaseException) -> None:
    where = f" writing {full.filename}" if full.filename else ""
    _fail(f"error: no space left on the disk of --workdir={FLAGS.workdir}{where} ({full.strerror or full}); "
          "the workdir keeps its last complete checkpoint and report: free space and rerun the same command to "
          "resume.", USER_ERROR_EXIT, err, now=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
