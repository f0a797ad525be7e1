"""Experiment trackers (TensorBoard, W&B, trackio, ...) through accelerate's tracking.

``TrainConfig.report_to`` names the trackers. The engine passes them to its Accelerator
(``log_with=``, ``project_dir=tracker_dir``), starts one tracker run per unlearning run
(project ``tracker_project``, run name ``run_name``, the flat train config as hyperparameters),
logs every metrics.jsonl record with the same numbers and its step, and finishes the trackers at
the end. :func:`log_final_table` logs a finished experiment's comparison table the same way.

Where each tracker writes: TensorBoard into ``<tracker_dir>/<tracker_project>/``; W&B, trackio and
the others into their own stores (W&B: ``<tracker_dir>/wandb``, offline with ``WANDB_MODE=offline``).

``Accelerator.end_training()`` is not used: besides finishing the trackers it destroys the process
group, and a multi-GPU experiment trains several sub-runs in one process group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retainfirst.errors import RetainFirstError

# pip package that provides each tracker accelerate knows (the tracker name where they agree).
TRACKER_PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "mlflow": "mlflow",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}

# Keyword of each tracker's init that names the run inside its project (others: project name only).
_RUN_NAME_KWARG = {"wandb": "name", "trackio": "name", "mlflow": "run_name"}


def known_trackers() -> list[str]:
    """Tracker names accelerate accepts in ``log_with`` (plus any registered with it), without "all"."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def tracker_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as a tracker here (unknown or not installed), or None."""
    from accelerate.tracking import get_available_trackers

    known = known_trackers()
    if name not in known:
        return f"has unknown tracker {name!r}; choose from {', '.join(known)}"
    builtin = name in TRACKER_PACKAGES
    if builtin and name not in {str(t) for t in get_available_trackers()}:
        return f"has {name!r}, which is not installed; pip install {TRACKER_PACKAGES[name]}"
    return None


def check_trackers(names: Sequence[str]) -> None:
    """RetainFirstError (one line) for the first tracker in ``names`` that cannot be used."""
    for name in names:
        problem = tracker_problem(name)
        if problem is not None:
            raise RetainFirstError(f"train config: report_to {problem}")


def flat_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config as the flat scalar mapping trackers accept as hyperparameters.

    Nested mappings become ``outer/inner`` keys; lists and None become their JSON text.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, prefix=f"{name}/"))
        elif isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def scalars(record: Mapping[str, Any]) -> dict[str, float | int | bool]:
    """The numbers of a metrics record that trackers can plot (``step`` is passed separately)."""
    out: dict[str, float | int | bool] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
            out[key] = value
    return out


def init_kwargs(run_name: str, tracker_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per-tracker init options: the run name where the tracker takes one, W&B's directory."""
    kwargs: dict[str, dict[str, Any]] = {name: {key: run_name} for name, key in _RUN_NAME_KWARG.items()}
    kwargs["wandb"]["dir"] = str(tracker_dir)
    return kwargs


def finish_trackers(accelerator: Any) -> None:
    """Finish every started tracker of ``accelerator`` (``end_training`` without ending the process group)."""
    trackers, accelerator.trackers = list(accelerator.trackers), []
    for tracker in trackers:
        tracker.finish()


def log_final_table(
    report_to: Sequence[str],
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    project: str = "retainfirst",
    run_name: str | None = None,
    table_name: str = "final_table",
) -> None:
    """Log an experiment's comparison table (one mapping per run, same keys) to each tracker.

    Every tracker gets the table as text (a markdown table) and each numeric cell as a scalar
    ``final/<first column value>/<column>``; trackers with tables (W&B) also get a real table.
    Call it from the main process only; a TensorBoard run goes into ``<out_dir>/<project>/``.
    """
    if not report_to or not rows:
        return
    check_trackers(report_to)
    from accelerate.state import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    PartialState()  # accelerate's trackers log through its logger, which needs the process state

    out_dir = Path(out_dir)
    run_name = run_name or f"{out_dir.name}-final"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    values: dict[str, Any] = {table_name: markdown_table(columns, rows)}
    for row in rows:
        label = str(row.get(columns[0]))
        values.update({f"final/{label}/{k}": v for k, v in scalars(row).items() if k != columns[0]})
    options = init_kwargs(run_name, out_dir)
    for name in dict.fromkeys(report_to):
        cls = LOGGER_TYPE_TO_CLASS[name]
        extra = options.get(name, {})
        tracker = cls(project, out_dir, **extra) if cls.requires_logging_directory else cls(project, **extra)
        if hasattr(tracker, "start"):  # accelerate >= 1.8 starts trackers lazily; older ones in __init__
            tracker.start()
        try:
            tracker.log(values, step=0)
            if hasattr(tracker, "log_table"):
                data = [[_cell(row.get(c)) for c in columns] for row in rows]
                tracker.log_table(table_name=f"{table_name}_table", columns=columns, data=data, step=0)
        finally:
            tracker.finish()


def _cell(value: Any) -> Any:
    """A table cell W&B accepts: numbers and text as they are, missing or non-finite as None."""
    if isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if value is None or isinstance(value, float):
        return None
    return json.dumps(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    def text(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(_cell(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(text(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
