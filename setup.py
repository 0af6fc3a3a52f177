"""Builds topoopt's compiled engine; optional, so a machine without a C compiler still installs
topoopt (it then takes the numpy and torch versions of the same loops).

-fopenmp-simd lets the compiler vectorise the engine's reductions (no OpenMP runtime is used)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("topoopt._native._engine", ["topoopt/_native/engine.c"],
                  extra_compile_args=["-O3", "-fopenmp-simd"], optional=True)
    ]
)
