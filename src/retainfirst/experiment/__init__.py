"""Experiments: run directories, the runner (prepare, train each sub-run, evaluate, report), console.

```python
from retainfirst.experiment import run_experiment, evaluate_model
result = run_experiment(config, "runs/demo")         # -> ExperimentResult(out_dir, runs, report, status)
results = evaluate_model(config, "runs/eval")        # -> list[EvalResult], written to results.json
```
"""

from retainfirst.experiment.evaluate import evaluate_model
from retainfirst.experiment.prepare import Prepared, evaluate, prepare
from retainfirst.experiment.rundir import RunDir
from retainfirst.experiment.runner import ExperimentResult, plan_summary, resume_config, run_experiment

__all__ = [
    "ExperimentResult",
    "Prepared",
    "RunDir",
    "evaluate",
    "evaluate_model",
    "plan_summary",
    "prepare",
    "resume_config",
    "run_experiment",
]
