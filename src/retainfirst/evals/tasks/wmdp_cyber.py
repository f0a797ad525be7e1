"""``wmdp_cyber``: WMDP cybersecurity questions, a forget number (accuracy; lower = more forgotten)."""

from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.wmdp import WmdpTask


@register_task("wmdp_cyber")
class WmdpCyberTask(WmdpTask):
    domain = "cyber"
    label = "WMDP-cyber"
    description = "accuracy on WMDP cybersecurity questions (lower = more forgotten)"
