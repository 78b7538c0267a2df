"""The trainer's modules. Importing any of them first quiets the dependencies' own output (utils/quiet.py), before
peft, transformers or diffusers are imported."""

from utils import quiet

quiet.install()
