"""Thin Faust agents, one file per step of the data flow in ARCHITECTURE.md.

Agents move records between topics and call the pure core in
:mod:`streamml.models`; only :mod:`streamml.app` imports this package.
"""
