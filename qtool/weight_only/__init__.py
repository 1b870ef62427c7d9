"""Weight-only quantization: blockwise int4/int8 MatMul weights, activations left float.

``qtool calibrate --weight-only`` (:func:`qtool.weight_only.run.weight_only_to_folder`);
the algorithms are one module each (``rtn``, ``hqq``, ``gptq``, ``awq``), the storage forms
are in ``formats`` (bit packing), ``emit`` (graph edits) and ``lpbq`` (QNN encodings).
"""
