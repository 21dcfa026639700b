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

Exit codes: 0 done; 1 a bad flag, config, dataset or checkpoint, a busy workdir or a diverged
run (one line on stderr names the file or field; nothing in the workdir is overwritten);
143 stopped by SIGTERM/SIGINT after checkpointing (rerun to resume).
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tna_jax import checkpoint as ckpt_lib
from tna_jax import config as config_lib
from tna_jax import data, runner, training
from tna_jax import workdir as workdir_lib

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
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


define_flags()

# Errors whose message says everything (the field, file or holder); shown without a traceback.
USER_ERRORS = (config_lib.ConfigError, data.DataError, ckpt_lib.CheckpointError, workdir_lib.WorkdirBusy,
               training.TrainingDiverged)


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
    """:func:`parse_flags`, printing absl's one-line ``FATAL Flags parsing error`` and exiting 1."""
    try:
        return parse_flags(argv)
    except flags.Error as err:
        sys.stderr.write(f"FATAL Flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.\n")
        raise SystemExit(1) from None


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


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """``jax.distributed.initialize`` from the flags (nothing without ``--coordinator``).

    Raises:
      absl.app.UsageError: ``--num_processes``/``--process_id`` without ``--coordinator``, a
        coordinator that is not ``host:port``, or a process id outside ``[0, num_processes)``.
    """
    import jax

    if not coordinator:
        if num_processes is not None or process_id is not None:
            raise app.UsageError("--num_processes and --process_id need --coordinator=HOST:PORT (or 'auto').")
        return
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", coordinator):
        raise app.UsageError(f"--coordinator must be HOST:PORT or 'auto'; got {coordinator!r}.")
    if num_processes is None or num_processes < 1:
        raise app.UsageError(f"--num_processes must be a positive integer with --coordinator; got {num_processes!r}.")
    if process_id is None or not 0 <= process_id < num_processes:
        raise app.UsageError(f"--process_id must be in [0, {num_processes}) (--num_processes={num_processes}); "
                             f"got {process_id!r}.")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    configure_cpu_devices(FLAGS.cpu_devices)
    initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    try:
        runner.run(FLAGS.config, FLAGS.workdir)
    except training.Preempted as stop:
        logging.warning("%s", stop)
        print(stop)
        raise SystemExit(143) from None  # 128 + SIGTERM: the job did not finish
    except USER_ERRORS as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
