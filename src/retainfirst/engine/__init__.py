"""The two-pass unlearning loop on accelerate: forget pass, retain pass, one synthesized update per step.

```python
cfg = TrainConfig(steps=150, lr=1e-5, synthesizer="sago", forget_loss="simnpo", retain_loss="nll")
result = unlearn(model, tokenizer, forget_examples, retain_examples, cfg, out_dir, resume=False)
```
Writes ``out_dir/metrics.jsonl`` (one line per step), ``out_dir/checkpoints/step-N`` (atomic, with a
``latest`` pointer), ``out_dir/train_config.json`` and ``out_dir/model`` (save_pretrained); with
``report_to`` the same per-step numbers also go to TensorBoard / W&B / ... (engine/tracking.py).
"""

from retainfirst.engine.config import TrainConfig
from retainfirst.engine.loop import UnlearnResult, save_model, unlearn
from retainfirst.engine.metrics import read_metrics
from retainfirst.engine.tracking import log_final_table

__all__ = ["TrainConfig", "UnlearnResult", "log_final_table", "read_metrics", "save_model", "unlearn"]
