"""Bridges to other training frameworks; each submodule imports its framework lazily.

``retainfirst.integrations.transformers``: a Hugging Face ``Trainer`` (and a mixin for existing
Trainer subclasses) that runs retainfirst's two-pass step with any registered synthesizer.
"""
