"""The Triton kernels of the adder layer, one module per pass: `forward`, `grad_input`, `grad_weight`.

Each module holds its kernel, its launch helper, the launcher (which receives a
`launch_config.KernelConfig`, or None for the module's heuristic default) and its limits. Nothing
here looks up tuned configs or chooses between methods: that is `triton_adder.backends.triton`.
"""
