"""Gradient synthesis: combine the forget gradient g_f and the retain gradient g_r into one update.

```python
syn = get_synthesizer("sago", alpha=1.0, gamma=1.0)        # gamma weights forget, alpha retain
update, stats = syn.combine(forget_grads, retain_grads)    # lists of Tensor | None, same order
```

Pure functions over lists of tensors (no model, no accelerate). ``combine`` consumes its inputs:
``update[i]`` is written into ``retain_grads[i]``'s storage (``forget_grads[i]``'s where the retain
gradient is None). Pass ``all_reduce_fn`` (sums a 1-D float32 tensor across ranks) when each rank
holds only a shard of each gradient (FSDP).

Built-in strategies (exact rules in :mod:`retainfirst.synthesis.strategies`): ``sum``,
``pcgrad``, ``pcgrad_global``, ``sago`` (option ``keep_retain_where_forget_zero``),
``sago_prefer_retain``, ``blur`` and the baseline ``retain_only``; other packages add strategies
through the ``retainfirst.synthesizers`` entry-point group (see :mod:`retainfirst.registry`).
Symmetric multi-task aggregators from torchjd (optional extra ``retainfirst[torchjd]``, see
:mod:`retainfirst.synthesis.multitask`): ``upgrad``, ``dualproj``, ``mgda``, ``cagrad``,
``aligned_mtl``, ``imtl_g``, ``nash_mtl``; they add weight_forget and weight_retain stats.
Stats always include conflict_fraction, cos_forget_retain, cos_update_retain, cos_update_forget, norm_forget,
norm_retain, norm_update; pcgrad* add projected_fraction, sago* replaced_fraction,
pcgrad_global and blur projection_coefficient.
"""

from retainfirst.synthesis import multitask as _multitask  # noqa: F401  (torchjd imported lazily)
from retainfirst.synthesis import strategies as _strategies  # noqa: F401  (registers the built-ins)
from retainfirst.synthesis.base import AllReduceFn, PairSums, Synthesizer, SynthesizerOptions
from retainfirst.synthesis.registry import (
    SYNTHESIZERS,
    available_synthesizers,
    get_synthesizer,
    register_synthesizer,
)

__all__ = [
    "SYNTHESIZERS",
    "AllReduceFn",
    "PairSums",
    "Synthesizer",
    "SynthesizerOptions",
    "available_synthesizers",
    "get_synthesizer",
    "register_synthesizer",
]
