"""Backends: one module per inference engine, its rules as data plus its emitter.

Installed as ``qtool.backends``.
"""
