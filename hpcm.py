"""HPCM (hierarchical progressive context modelling) learned image codec whose context cells are RWKV blocks
(SpatialMix with OmniShift and Bi-WKV4, ChannelMix), with a real rANS bitstream.

Pure functions over parameter dicts. Imports only torch, numpy, einops and the standard library; cupy is imported
lazily, inside the CUDA path of Bi-WKV4, to load wkv_kernel.cu.
"""

# ================================================================================================================
# Bi-WKV4: dense reference, torch scan, CUDA kernel via cupy (issue 7)


# ================================================================================================================
# RWKV blocks: OmniShift, SpatialMix, ChannelMix, RWKVContextCell, RWKVFusionBlock, RWKVFusionNet (issue 7)


# ================================================================================================================
# entropy models and rANS coding (issue 8)


# ================================================================================================================
# transforms, HPCM context model, full codec, compress/decompress (issue 8)


# ================================================================================================================
# loss and data (issue 8)
