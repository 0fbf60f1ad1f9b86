"""Only the C extension lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("nodeagent._native", ["nodeagent/_native.c"], extra_compile_args=["-O3"]),
    ]
)
