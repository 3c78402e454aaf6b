"""HPCM (hierarchical progressive context modelling) learned image codec whose context cells are RWKV blocks
(SpatialMix with OmniShift and Bi-WKV4, ChannelMix), with a real rANS bitstream.

Pure functions over parameter dicts. Imports only torch, numpy, einops and the standard library; cupy is imported
lazily, inside the CUDA path of Bi-WKV4, to load wkv_kernel.cu.
"""
