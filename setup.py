"""Builds topoopt's one compiled helper; optional, so a machine without a C compiler still
installs topoopt (it then uses the numpy version of the same loop)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("topoopt._native._prim", ["topoopt/_native/prim.c"], extra_compile_args=["-O3"], optional=True)
    ]
)
