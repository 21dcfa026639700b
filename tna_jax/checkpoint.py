"""Checkpoints (orbax) and reports (JSON), written atomically and checked when read. No pickle.

* :func:`write_json` / :func:`read_json`: a file is written to a temporary name in the same
  directory, flushed, fsynced and renamed, so a reader sees the old file or the new one, never
  half of one.
* :class:`Checkpointer`: an ``orbax.checkpoint.CheckpointManager`` of numbered steps, each holding
  the train state (any pytree of arrays), optional extra arrays (the anchor mask, saved beside the
  state so users can read it alone) and JSON metadata. Orbax finalises a step by renaming its
  temporary directory, so a step is either complete or absent. On top of that every save records
  a SHA-256 digest of the arrays; :meth:`Checkpointer.restore` recomputes it, so a truncated or
  bit-flipped file is detected and the previous good step is used instead (with a warning), or a
  clear error names the directory when no good step is left. Restores always use an explicit
  abstract target (shapes, dtypes, shardings): nothing in a file decides what gets built.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from typing import Any

import jax
import numpy as np

from tna_jax import hooks
from tna_jax import tree as tree_lib
from tna_jax.distributed import to_host

__all__ = ["write_json", "write_text", "read_json", "json_ready", "dumps", "tree_digest", "Checkpointer",
           "CheckpointError", "remove_stale_temporaries"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not match what the caller expects."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def json_ready(obj: Any) -> Any:
    """`obj` with only what strict JSON holds: NaN and ±Inf become None (``null``).

    NumPy and JAX scalars and arrays become numbers and lists, tuples lists, sets sorted lists,
    NumPy keys of dicts Python ones. Python's ``json`` writes NaN as a bare ``NaN`` token, which is
    not JSON (RFC 8259) and which strict parsers (JavaScript, ``jq``, Go, Rust's serde) reject;
    a missing value is ``null`` instead.

    Args:
      obj: JSON-like data.

    Returns:
      A copy made of dicts, lists, strings, finite numbers, booleans and None.

    Raises:
      TypeError: an object JSON cannot represent.

    Examples:
      >>> import numpy as np
      >>> json_ready({"acc": np.float32(0.5), "val": float("nan"), "curve": np.array([1.0, np.inf])})
      {'acc': 0.5, 'val': None, 'curve': [1.0, None]}
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, int):
        return obj
    if isinstance(obj, dict):
        return {(k.item() if isinstance(k, np.generic) else k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # an ml_collections ConfigDict
        return json_ready(obj.to_dict())
    return json_ready(_json_default(obj))


def dumps(obj: Any, *, indent: int | None = None, sort_keys: bool = True) -> str:
    """`obj` as strict JSON text (`json_ready`, then ``allow_nan=False``): what every file
    tna_jax writes uses (reports, ``config.json``, ``metrics.jsonl``).

    Args:
      obj: JSON-like data.
      indent: indentation (None = one line).
      sort_keys: sort the keys of dicts.

    Returns:
      The text, without a trailing newline.

    Examples:
      >>> dumps({"b": float("nan"), "a": 1})
      '{"a": 1, "b": null}'
    """
    return json.dumps(json_ready(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str, obj: Any, *, indent: int | None = 2) -> str:
    """Writes `obj` as strict JSON to `path` atomically (temp file + fsync + rename); returns `path`.

    NumPy and JAX scalars and arrays are written as numbers and lists, sets as sorted lists, and
    NaN / ±Inf as ``null`` (`json_ready`): the file parses with any strict JSON parser.

    Args:
      path: the file (its directory is created).
      obj: JSON-serialisable data.
      indent: indentation (None = one line).

    Returns:
      `path`.

    Raises:
      TypeError: an object JSON cannot represent; nothing is written then.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> path = write_json(os.path.join(tempfile.mkdtemp(), "r.json"), {"acc": np.float32(0.5), "n": np.arange(2)})
      >>> read_json(path)
      {'acc': 0.5, 'n': [0, 1]}
    """
    # Serialised before anything touches the disk: an unserialisable object leaves no file behind.
    text = dumps(obj, indent=indent) + "\n"
    return write_text(path, text)


def write_text(path: str, text: str) -> str:
    """Writes `text` to `path` atomically: a temporary file in the same directory, fsync, rename.

    A reader sees the old file or the new one, never a part; a process killed in between leaves
    only a temporary (``.<name>.<random>.tmp``, removed by :func:`remove_stale_temporaries`).
    The file is made 0644 (``mkstemp`` makes 0600: reports must stay readable by the group).

    Args:
      path: the file (its directory is created).
      text: the contents.

    Returns:
      `path`.

    Examples:
      >>> import os, tempfile
      >>> path = write_text(os.path.join(tempfile.mkdtemp(), "report.md"), "# hello\\n")
      >>> open(path).read(), oct(os.stat(path).st_mode & 0o777)
      ('# hello\\n', '0o644')
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchmod(f.fileno(), 0o644)
            f.flush()
            os.fsync(f.fileno())
        hooks.fire(f"write:{os.path.basename(path)}", directory)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # mkstemp names of write_json / write_text


def remove_stale_temporaries(directory: str) -> list[str]:
    """Deletes the temporary files that :func:`write_json` / :func:`write_text` leave in
    `directory` when killed between writing and renaming; returns their names.

    Call it only while no other process writes there (a run holds its workdir's lock).

    Args:
      directory: the directory to clean (not recursive).

    Returns:
      The names of the files removed, sorted.

    Examples:
      >>> import tempfile
      >>> remove_stale_temporaries(tempfile.mkdtemp())
      []
    """
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _TEMPORARY.match(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def read_json(path: str) -> Any:
    """Reads a JSON file, with an error that names the file when it is missing or malformed.

    Args:
      path: the file.

    Returns:
      The decoded data.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not valid JSON (line and column named).

    Examples:
      >>> import os, tempfile
      >>> path = write_text(os.path.join(tempfile.mkdtemp(), "bad.json"), "{")
      >>> try:
      ...     read_json(path)
      ... except ValueError as err:
      ...     print(str(err).split(": ", 1)[1])
      Expecting property name enclosed in double quotes.
    """
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}.") from None


def tree_digest(tree: Any) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every leaf (host copy).

    Args:
      tree: a pytree of arrays.

    Returns:
      The hex digest; equal for trees with equal names, shapes, dtypes and values.

    Examples:
      >>> import numpy as np
      >>> tree_digest({"w": np.zeros(2)}) == tree_digest({"w": np.zeros(2)}) != tree_digest({"w": np.ones(2)})
      True
    """
    h = hashlib.sha256()
    for name, leaf in tree_lib.named_leaves(tree):
        arr = np.asarray(to_host(leaf))  # the whole array, also when other processes hold parts
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of an array, a ``ShapeDtypeStruct`` or an orbax array metadata."""
    dtype = getattr(leaf, "dtype", None)
    try:
        name = str(np.dtype(dtype))
    except TypeError:  # typed PRNG keys and other extended dtypes
        name = str(dtype)
    return tuple(int(d) for d in getattr(leaf, "shape", np.shape(leaf))), name


def _abstract(tree: Any) -> Any:
    """Restore targets with a sharding on every leaf: the leaf's own, else the first local device
    (so that a checkpoint written by 4 devices restores on 1, where orbax refuses to guess)."""
    default = None

    def one(x):
        nonlocal default
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            default = default or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            sharding = default
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class Checkpointer:
    """Numbered checkpoints of a pytree state (plus extra arrays and JSON metadata) in `directory`.

    Args:
      directory: where the steps live (created if missing).
      keep: how many most recent steps to keep.
      mask_scheme: for states that hold anchor masks, the mask-drawing scheme
        (`tna_jax.anchors.MASK_SCHEME`): recorded with every step, and a step recorded under
        another scheme (or none) is refused on restore, naming both.

    Raises:
      ValueError: `keep` not a positive integer.
      CheckpointError: (from :meth:`restore`) a step that is damaged, or of another model (the
        first leaf whose shape or dtype differs is named with both).

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> ckpt = Checkpointer(tempfile.mkdtemp())
      >>> ckpt.save(3, {"w": jnp.arange(4.0)}, meta={"epoch": 3})
      >>> state, extras, meta = ckpt.restore({"w": jnp.zeros(4)})
      >>> state["w"].tolist(), meta["epoch"], ckpt.latest_step()
      ([0.0, 1.0, 2.0, 3.0], 3, 3)
    """

    def __init__(self, directory: str, keep: int = 2, *, mask_scheme: str | None = None):
        import orbax.checkpoint as ocp

        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive integer (steps to keep); got {keep!r}.")

        self._ocp = ocp
        self.keep = keep
        self.mask_scheme = mask_scheme
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
        # Handlers named up front, so that a fresh process can read what a step holds (shapes and
        # dtypes) before restoring it.
        handlers = {"state": ocp.StandardCheckpointHandler(), "extras": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, *, extras: Any = None, meta: dict[str, Any] | None = None) -> None:
        """Saves `state` (and `extras`, `meta`) as step `step`; complete or not at all.

        Raises:
          ValueError / TypeError: a step that is not an integer >= 0; a leaf that is not an array.
        """
        ocp = self._ocp
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer; got {step!r}.")
        for label, tree in (("state", state), ("extras", extras)):
            for name, leaf in tree_lib.named_leaves(tree) if tree is not None else []:
                if not isinstance(leaf, (np.ndarray, jax.Array, np.generic)):
                    raise TypeError(f"{label} leaves must be arrays; got {type(leaf).__name__} at path {name!r}.")
        meta = dict(meta or {})
        if self.mask_scheme is not None:
            meta["mask_scheme"] = self.mask_scheme
        meta["state_digest"] = tree_digest(state)
        if extras is not None:
            meta["extras_digest"] = tree_digest(extras)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if extras is not None:
            items["extras"] = ocp.args.StandardSave(extras)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of step `step` (epoch, runs, digests)."""
        ocp = self._ocp
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _check_stored(self, step: int, item: str, target: Any) -> None:
        """Compares the leaves a step holds (names, shapes, dtypes, read from orbax's metadata)
        with `target`, so that a checkpoint of another model fails with the first leaf that
        differs instead of deep inside orbax (or, for a dtype, silently cast)."""
        path = os.path.join(self.directory, str(step))
        stored = self._manager.item_metadata(step)[item]
        if stored is None:
            raise CheckpointError(f"checkpoint {path} holds no {item!r} item.")
        have = {name: _shape_dtype(leaf) for name, leaf in tree_lib.named_leaves(stored.tree)}
        want = {name: _shape_dtype(leaf) for name, leaf in tree_lib.named_leaves(target)}
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing or extra:
            first = (f"{missing[0]!r} is expected but not in the checkpoint" if missing
                     else f"{extra[0]!r} is in the checkpoint but not expected")
            raise CheckpointError(f"checkpoint {path} was saved for another model: {item} {first} "
                                  f"({len(have)} leaves there, {len(want)} expected).")
        for name, expected in want.items():
            if have[name] != expected:
                raise CheckpointError(f"checkpoint {path} was saved for another model: {item} {name!r} has "
                                      f"shape {have[name][0]} and dtype {have[name][1]} there; expected shape "
                                      f"{expected[0]} and dtype {expected[1]}.")

    def _restore_step(self, step: int, target: Any, extras_target: Any, *,
                      with_state: bool = True) -> tuple[Any, Any, dict[str, Any]]:
        ocp = self._ocp
        path = os.path.join(self.directory, str(step))
        meta = self.read_meta(step)
        if self.mask_scheme is not None and meta.get("mask_scheme") != self.mask_scheme:
            recorded = meta.get("mask_scheme") or "none recorded (written before schemes were recorded)"
            raise CheckpointError(
                f"checkpoint {path} holds anchor masks drawn under mask scheme {recorded!r}; this version of "
                f"tna_jax draws them under {self.mask_scheme!r}, so a resumed run would not train the masks "
                "it started with. Use a fresh workdir (or the tna_jax version that wrote it).")
        items = {}
        if with_state:
            self._check_stored(step, "state", target)
            items["state"] = ocp.args.StandardRestore(_abstract(target))
        if extras_target is not None:
            if "extras_digest" not in meta:
                if not with_state:
                    raise CheckpointError(f"checkpoint {path} holds no extra arrays.")
            else:
                self._check_stored(step, "extras", extras_target)
                items["extras"] = ocp.args.StandardRestore(_abstract(extras_target))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = None
        if with_state:
            state = restored["state"]
            tree_lib.check_same_structure(target, state, names=("expected state", f"checkpoint {path}"))
            if tree_digest(state) != meta.get("state_digest"):
                raise CheckpointError(f"checkpoint {path} is damaged: its arrays do not match the digest "
                                      "recorded when it was saved (truncated or modified files).")
        extras = restored.get("extras") if "extras" in items else None
        if extras is not None and tree_digest(extras) != meta.get("extras_digest"):
            raise CheckpointError(f"checkpoint {path} is damaged: its extra arrays do not match their digest.")
        return state, extras, meta

    def restore(self, target: Any, *, step: int | None = None, extras_target: Any = None,
                fallback: bool = True) -> tuple[Any, Any, dict[str, Any]]:
        """Restores step `step` (default: the latest good one) into the structure of `target`.

        Args:
          target: a pytree of arrays or ``jax.ShapeDtypeStruct`` (with shardings) describing the
            state; the checkpoint must have exactly this structure, shapes and dtypes.
          step: a specific step, or None for the latest.
          extras_target: structure of the extra arrays, or None to skip them.
          fallback: when the latest step is damaged, warn and try older ones.

        Returns:
          ``(state, extras, meta)``.

        Raises:
          CheckpointError: no checkpoint, or every candidate is damaged or of another model (the
            message names the directory and what failed).
        """
        return self._first_good(step, fallback, lambda s: self._restore_step(s, target, extras_target))

    def restore_extras(self, extras_target: Any, *, step: int | None = None,
                       fallback: bool = True) -> tuple[Any, dict[str, Any]]:
        """Restores only the extra arrays (e.g. the anchor mask) of step `step` (default: the
        latest good one), checked against `extras_target` and their digest.

        Returns:
          ``(extras, meta)``.

        Raises:
          CheckpointError: no checkpoint, no extras in it, or extras of another shape or dtype
            (the message names the step directory and the first leaf that differs).

        Examples:
          >>> import tempfile, jax.numpy as jnp
          >>> ckpt = Checkpointer(tempfile.mkdtemp())
          >>> ckpt.save(1, {"w": jnp.ones(3)}, extras={"mask": jnp.array([True, False, True])})
          >>> extras, meta = ckpt.restore_extras({"mask": jnp.zeros(3, bool)})
          >>> extras["mask"].tolist()
          [True, False, True]
        """
        _, extras, meta = self._first_good(
            step, fallback, lambda s: self._restore_step(s, None, extras_target, with_state=False))
        return extras, meta

    def _first_good(self, step: int | None, fallback: bool, restore_one: Any) -> Any:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}.")
        candidates = [step] if step is not None else list(reversed(steps))
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {self.directory}; steps there: {steps}.")
        errors = []
        for s in candidates if fallback else candidates[:1]:
            try:
                return restore_one(s)
            except Exception as err:  # orbax/tensorstore raise many types on damaged files
                where = os.path.join(self.directory, str(s))
                first = str(err).splitlines()[0] if str(err) else ""
                own = isinstance(err, CheckpointError) and first.startswith(f"checkpoint {where} ")
                reason = first[len(f"checkpoint {where} "):] if own else f"{type(err).__name__}: {first}"
                errors.append(f"{where} {reason}" if own else f"{where}: {reason}")
                if fallback and s != candidates[-1]:
                    warnings.warn(f"checkpoint {where} could not be restored ({reason}); trying the previous one.",
                                  stacklevel=3)
        raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(errors))

    def delete_after(self, step: int) -> None:
        """Deletes steps newer than `step` (used when resuming from an older, good step)."""
        for s in self.steps():
            if s > step:
                self._manager.delete(s)

    def prune(self) -> list[int]:
        """Deletes the oldest steps beyond `keep`; returns them.

        Orbax deletes old steps after it finalises a new one: a process killed in between leaves
        one step too many, which the run that resumes removes here.
        """
        extra = self.steps()[:-self.keep]
        for s in extra:
            self._manager.delete(s)
        return extra

    def close(self) -> None:
        self._manager.close()
