"""Compiled CPU kernels (C++ torch ops in namespace `loraplex`), built on first use; see loader.py."""
