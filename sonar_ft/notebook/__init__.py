"""Helpers for the Colab notebooks: display and setup (``colab``, no torch at import) and the heavy steps
that have no ``sonar-ft`` command of their own (``steps``, run in the stack environment).
"""
