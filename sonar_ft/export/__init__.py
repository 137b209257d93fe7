"""A fine-tuned encoder as a tarball: packing it with its records and model card (``pack``), and reading it
back safely (``load``). Imports models and files; inference reads exports through ``load``.
"""
