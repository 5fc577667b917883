"""Only the C abort callback needs setup.py; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("orcd._abortflag", sources=["orcd/_abortflag.c"])])
