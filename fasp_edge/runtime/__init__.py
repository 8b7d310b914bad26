"""The runtime: open any artifact (an ExecuTorch ``.pte``, an ONNX graph, a PyTorch model or checkpoint)
behind one ``step(tokens, start) -> logits`` interface, read and verify a bundle, generate, and the one
parity rule every artifact is held to.

It sits above the model families and below export: export writes artifacts and verifies them by opening them
here, with the same code a user's ``fasp-edge generate`` and ``fasp-edge bench`` run.
"""
