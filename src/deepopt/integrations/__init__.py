"""Integrations with training frameworks, one module each, imported on demand.

* :mod:`deepopt.integrations.lightning`: ``Trainer(callbacks=[DeepOpt()])`` (Lightning).
* :mod:`deepopt.integrations.huggingface`: ``Trainer(..., callbacks=[DeepOpt()])``
  (Hugging Face ``transformers``).

Importing :mod:`deepopt` imports neither framework; each module here needs its own.
"""
