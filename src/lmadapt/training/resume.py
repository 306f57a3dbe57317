"""What ``--resume`` may change, and what it says when it cannot continue a run.

A resumed run must end where the run would have ended uninterrupted, so the config it is given is compared
with the run's own ``config.yaml`` before anything is loaded. Settings that only decide what is logged,
validated or kept may change (:data:`FREE`); ``train.max_steps`` may grow, and the schedule settings change,
when the learning rate of every step the run was started for stays the same (:func:`schedule_problem`:
``constant``, ``infinite``, ``inverse_sqrt`` with a warm-up in steps); every other difference is
refused with one error that lists them all. A setting the run's ``config.yaml`` lacks (a run made before
that setting existed) counts as its default. A run that already wrote its ``report.json`` is finished: it
is continued only when ``max_steps`` grew.
"""

from __future__ import annotations

import copy
import re
import reprlib
from pathlib import Path
from typing import Any

from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.jsonfile import JsonFileError, read_json_object
from lmadapt.reporting import read_metrics
from lmadapt.training.checkpoint import checkpoint_dirs
from lmadapt.training.schedules import INFINITE, SETTINGS, Schedule
from lmadapt.yamlfile import read_yaml

FREE = ("train.save_every", "train.keep_last", "train.log_every", "train.eval_every", "train.eval_batches",
        "train.tensorboard", "train.nan_policy", "train.gradient_checkpointing", "evals[].name", "evals[].role",
        "evals[].every")
"""Keys a resumed run may change: they decide what is logged, validated and kept (and, for ``nan_policy``,
whether a non-finite step stops the run; for ``gradient_checkpointing``, what is recomputed instead of
stored), not what a completed step computes. ``evals[]``: any entry's."""
KEPT = ("train.threads",)
"""Keys whose value the run keeps from its first start whatever the config says (the thread count decides
the order of float sums, so keeping it keeps the resume bit-exact)."""
IGNORED = ("output_dir", "overwrite")
"""Keys that are not settings of the run: the folder is where it is now; ``--overwrite`` is refused with
``--resume``."""
_MISSING = object()
_show = reprlib.Repr()  # values in messages, shortened: the run's and the new config's may be long lists
_show.maxstring, _show.maxother, _show.maxlist, _show.maxdict, _show.maxlevel = 60, 60, 4, 4, 2


class ResumeError(LmadaptError):
    """``--resume`` cannot continue this run: the config differs, the run is finished, or it has no checkpoint."""


def run_config_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's own ``config.yaml`` as a dict (None when the folder has none)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return read_yaml(path)
    except ConfigError as exc:
        raise ResumeError(f"cannot resume {run_dir}: its config.yaml is unreadable ({'; '.join(exc.problems)}); "
                          f"start a new run in another output_dir") from None


def with_defaults(saved: Any, defaults: Any) -> Any:
    """``saved`` with the keys it lacks (at any depth of sections) taken from ``defaults``."""
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    return {**defaults, **{k: with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def differences(saved: Any, now: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, run's value, new value)`` for every leaf that differs (list entries that are sections,
    such as ``evals``, are compared entry by entry when both lists have the same length)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [*saved, *(k for k in now if k not in saved)]
        return [d for k in keys
                for d in differences(saved.get(k, _MISSING), now.get(k, _MISSING), f"{key}.{k}" if key else k)]
    if (isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now)
            and any(isinstance(v, dict) for v in saved)):
        return [d for i, (a, b) in enumerate(zip(saved, now)) for d in differences(a, b, f"{key}[{i}]")]
    return [] if saved == now else [(key, saved, now)]


SCHEDULE = ("train.max_steps", *(f"train.{key}" for key in SETTINGS))
"""Keys a resumed run may change together when the learning rate of every step of the run as started stays the
same (:func:`schedule_problem`): to extend a run whose schedule has no end built in, and to switch on its
annealing over the added steps."""


def schedule_problem(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why the schedule of the ``train:`` section ``saved`` may not become that of ``now`` (None when it may).

    The learning rate of step t is ``lr * f(t; max_steps, schedule settings)``. The change is allowed when
    ``max_steps`` does not shrink and f is the same at every step t < the run's ``max_steps``: a resumed run
    then repeats the steps it took and continues as a run started with the new settings would. That holds for
    ``constant``, ``infinite`` and ``inverse_sqrt`` with the warm-up (and cooldown) in steps and ``anneal``
    off, or annealing only over the added steps; with ``cosine``, ``linear`` and ``wsd`` the decay is spread
    over the total, so every step's rate depends on it.
    """
    old, new = saved.get("max_steps"), now.get("max_steps")
    if old == new == 0:
        return "the run's length comes from train.epochs (max_steps 0), so its schedule cannot change on resume"
    if not (isinstance(old, int) and isinstance(new, int) and 0 < old <= new):
        return "max_steps may only grow, and only in a run started with max_steps > 0"
    before, after = Schedule.of(saved, old), Schedule.of(now, new)
    changed = next((t for t in range(old) if before.factor(t) != after.factor(t)), None)
    if changed is None:
        return None
    if after.name not in INFINITE:
        return (f"with schedule {after.name} the learning rate of every step depends on max_steps, so the steps "
                f"already taken would not be those of the longer run; only schedules constant, infinite and "
                f"inverse_sqrt may grow")
    if before.warmup != after.warmup and not now.get("warmup_steps") and now.get("warmup_ratio"):
        return "the warm-up is warmup_ratio x max_steps, so it would change; only a run with warmup_steps may grow"
    if before.cooldown != after.cooldown and not now.get("cooldown_steps") and now.get("cooldown_ratio"):
        return ("the cooldown is cooldown_ratio x max_steps, so it would change; only a run with cooldown_steps "
                "may grow")
    if before.anneal_start is not None and changed >= before.anneal_start:
        return (f"the run annealed its last steps (anneal true, from step {before.anneal_start + 1}), so it cannot "
                f"continue at the constant rate; start a new run from its result (docs/training.md, re-warming), "
                f"or extend runs with anneal false and switch it on with the last extension")
    start = after.anneal_start
    if start is not None and start < old:
        return (f"annealing (the last decay_ratio x max_steps) would start at step {start + 1}, within the {old} "
                f"steps the run was started for; anneal over the added steps only: decay_ratio <= "
                f"{(new - old) / new:.4g}, or a larger max_steps")
    return (f"the learning rate of step {changed + 1} would be {after.factor(changed):.6g} x lr instead of "
            f"{before.factor(changed):.6g} x lr")


def _show_value(value: Any) -> str:
    return "(not set)" if value is _MISSING else _show.repr(value)


def _section(record: dict[str, Any], name: str) -> dict[str, Any]:
    value = record.get(name)
    return value if isinstance(value, dict) else {}


def resumed_record(run_dir: Path, saved: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config the resumed run continues with (``now``, keeping the :data:`KEPT` values of ``saved``) and
    its allowed changes as ``key: X -> Y``; a :class:`ResumeError` listing every refused difference."""
    refused, changed = [], []
    for key, old, new in differences(saved, now):
        if key in IGNORED or key in KEPT:
            continue
        why = schedule_problem(_section(saved, "train"), _section(now, "train")) if key in SCHEDULE else None
        if re.sub(r"\[\d+\]", "[]", key) in FREE or (key in SCHEDULE and why is None):
            changed.append(f"{key}: {_show_value(old)} -> {_show_value(new)}")
        else:
            because = f" ({why})" if why else ""
            refused.append(f"  {key}: run has {_show_value(old)}, now {_show_value(new)}{because}")
    if refused:
        raise ResumeError(
            f"--resume continues {run_dir} with the config it was started with ({run_dir / 'config.yaml'}), but "
            f"this config differs:\n" + "\n".join(refused) + "\nResume with the run's own config (that file), or "
            f"start a new run in another output_dir. A resumed run may change only {', '.join(FREE)}, and grow "
            f"train.max_steps (with the schedule settings) when the learning rate of every step it was started "
            f"for stays the same: schedules constant, infinite and inverse_sqrt, warm-up in steps, annealing "
            f"over the added steps only.")
    record = copy.deepcopy(now)
    for key in KEPT:
        section, name = key.split(".")
        if name in _section(saved, section) and section in record:
            record[section][name] = saved[section][name]
    return record, changed


def check_not_finished(run_dir: Path, max_steps: int) -> None:
    """A :class:`ResumeError` when the run already wrote its ``report.json`` (its last step), unless
    ``max_steps`` now asks for more steps than it ran."""
    path = run_dir / "report.json"
    if not path.is_file():
        return
    try:
        steps = read_json_object(path).get("steps")
    except JsonFileError:
        steps = None
    if max_steps > 0 and isinstance(steps, int) and steps < max_steps:
        return
    ran = f"{steps} steps" if isinstance(steps, int) else "its steps"
    raise ResumeError(f"{run_dir} is already finished: it ran {ran} and wrote report.json; nothing to resume. "
                      f"To train longer, resume with a larger train.max_steps (schedules constant, infinite and "
                      f"inverse_sqrt); "
                      f"to train again, start a new run in another output_dir (or replace this one with --overwrite).")


def no_checkpoint_message(run_dir: Path, save_every: int) -> str:
    """Why ``run_dir`` cannot be resumed when it holds no complete checkpoint, and what to do."""
    if not run_dir.exists():
        return f"cannot resume: {run_dir} does not exist; start the run without --resume"
    if not (run_dir / "config.yaml").is_file():
        return f"cannot resume {run_dir}: it holds no run (no config.yaml); start the run without --resume"
    again = "start it again without --resume (with --overwrite)"
    if not save_every:
        return (f"cannot resume {run_dir}: the run keeps no checkpoints (train.save_every = 0); {again}, with "
                f"train.save_every > 0 to be able to resume it")
    metrics = run_dir / "metrics.jsonl"
    steps = [r["step"] for r in read_metrics(metrics) if isinstance(r.get("step"), int)] if metrics.is_file() else []
    return (f"cannot resume {run_dir}: no checkpoint yet: the run stopped at step {max(steps, default=0)} before "
            f"the first save (save_every = {save_every}); {again}")


def interrupt_message(run_dir: Path, step: int, save_every: int) -> str:
    """What an interrupted run leaves for ``--resume``: the checkpoint it would continue from, or none."""
    found = checkpoint_dirs(run_dir)
    if found:
        return f"interrupted at step {step}; --resume continues from {found[-1]}"
    if not save_every:
        return (f"interrupted at step {step}; this run keeps no checkpoints (train.save_every = 0), so --resume "
                f"cannot continue it")
    return (f"interrupted at step {step}; no checkpoint yet (the first is written at step {save_every}), so "
            f"--resume cannot continue it")


def check_resume(run_dir: Path, now: dict[str, Any] | None, save_every: int, max_steps: int,
                 defaults: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """Check that ``run_dir`` can be resumed with the config ``now`` (a dict as ``config.yaml`` records it;
    None: the caller does not compare configs; ``defaults``: the config's defaults, for settings the run's
    file lacks); returns the record to write once the checkpoint is restored (None when ``config.yaml``
    stays as it is) and the allowed changes.

    In this order: the config differs only where it may, the run is not finished, a checkpoint exists.
    """
    saved = run_config_record(run_dir)
    record, changed = None, []
    if now is not None and saved is not None:
        record, changed = resumed_record(run_dir, with_defaults(saved, defaults), now)
        check_not_finished(run_dir, max_steps)
    if not checkpoint_dirs(run_dir):
        run_save_every = _section(saved or {}, "train").get("save_every", save_every)
        raise ResumeError(no_checkpoint_message(run_dir, run_save_every if isinstance(run_save_every, int)
                                                else save_every))
    return (record if record is not None and record != saved else None), changed
