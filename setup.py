"""Builds topoopt's one compiled helper; optional, so a machine without a C compiler still
installs topoopt (it then uses numpy and torch versions of the same loops)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("topoopt._native._engine", ["topoopt/_native/engine.c"], extra_compile_args=["-O3", "-fopenmp-simd"], optional=True)
    ]
)
