// Bi-WKV4 forward and backward kernels, loaded by hpcm.py with cupy.RawKernel (issue 7).
