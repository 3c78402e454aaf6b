"""Plastic Continuous Thought Machine: the CTM (Darlow et al., 2025, SakanaAI/continuous-thought-machines) plus
hypernetworks that make the synapse and neuron-level weights plastic at inference.

Pure functions over parameter dicts: `init_x(gen, ...) -> dict` makes parameters, `x(p, ...) -> y` applies them.
Imports only torch, numpy, einops and the standard library, so this one file can be copied into another project.
"""
