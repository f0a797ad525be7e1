"""retainfirst: retention-prioritized machine unlearning for causal language models.

Each unlearning step computes a forget gradient g_f and a retain gradient g_r separately; a
synthesizer (:mod:`retainfirst.synthesis`) combines them into the update, retention first.
"""

from retainfirst.errors import RetainFirstError

__version__ = "0.1.0"
__all__ = ["RetainFirstError", "__version__"]
