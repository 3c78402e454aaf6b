"""Plastic Continuous Thought Machine: the CTM (Darlow et al., 2025, SakanaAI/continuous-thought-machines) plus
hypernetworks that make the synapse and neuron-level weights plastic at inference.

Pure functions over parameter dicts: `init_x(gen, ...) -> dict` makes parameters, `x(p, ...) -> y` applies them.
Imports only torch, numpy, einops and the standard library, so this one file can be copied into another project.
"""

# ================================================================================================================
# building blocks: linear, layer norm, GLU, attention, SuperLinear (issue 3)


# ================================================================================================================
# plastic hypernetworks: HyperLoRALinear, HyperSuperLinear (issue 4)


# ================================================================================================================
# synapses (SynapseUNET / HyperSynapseUNET), neuron-level models, synchronisation, certainty, backbones (issue 3)


# ================================================================================================================
# the (Hyper) Continuous Thought Machine (issue 3; hyper fields wired in by issue 4)


# ================================================================================================================
# losses (issue 3)


# ================================================================================================================
# tasks: mazes, parity, images (issue 3)
