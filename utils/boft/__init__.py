"""BOFT adapters: the rotation maths in plain PyTorch (rotation.py), which layers they wrap and which block shapes fit
(shapes.py), and the one module that touches peft's internals (peft_seam.py, installed explicitly by each entry
point). Importing this package changes nothing in peft."""
