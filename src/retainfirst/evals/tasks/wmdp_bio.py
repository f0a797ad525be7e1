"""``wmdp_bio``: WMDP biology questions, a forget number (accuracy; lower = more forgotten)."""

from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.wmdp import WmdpTask


@register_task("wmdp_bio")
class WmdpBioTask(WmdpTask):
    domain = "bio"
    label = "WMDP-bio"
    description = "accuracy on WMDP biology questions (lower = more forgotten)"
