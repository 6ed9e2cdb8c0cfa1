"""The training mechanisms, one module each: a pure function on tensors plus a thin state.

Mechanisms never import each other; :mod:`deepopt.optimizer` is the only place that
composes them.
"""
