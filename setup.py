"""Builds the Cython core. Metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "pigeon._core",
        ["pigeon/_core.pyx"],
        extra_compile_args=["-O2"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
