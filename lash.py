"""LASH (Layered Adaptive Supervision Hierarchy) and ASHEM (adaptive supervision via hard example mining) on a
decoder-only transformer language model.

Pure functions over parameter dicts. Imports only torch, numpy, einops and the standard library.
"""
